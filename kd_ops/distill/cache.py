"""Teacher-output cache: a large teacher runs once over the transfer set, not once per epoch or run.

A cache entry is named by everything its contents depend on (`CacheKey`): the teacher's weights,
the data rows, the input transform, the tapped layers and the logit compression. Nothing is ever
looked up by a name the caller chose, so a retrained teacher or a re-split dataset cannot be
served stale outputs.

File layout: one `<root>/<key digest>.pt` per entry, written by `torch.save` and holding
`{"meta": {...}, "tensors": {name: tensor}}`. One file, because a single `os.replace` then
publishes the header and the tensors together: a pair of files could be half-replaced by a
crash or by two writers. `meta` holds only str/int/list/dict/None (JSON-able), so the entry
loads with `torch.load(weights_only=True)` and reading a cache never unpickles code. `meta`
records the format version, the key digest and fields, each stored tensor's shape and dtype,
and a sha256 over the stored tensors: a file that is truncated, unreadable, edited, or copied
from another key is detected, logged, deleted and recomputed, never returned.

Writes go to `.<digest>.pt.<random>.tmp` in the same directory, then `os.replace`: readers see
the old entry, or no entry, or the whole new one. A temp file left by a killed process never
matches a cache name and is never read (it is safe to delete).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

log = logging.getLogger("kd_ops.distill.cache")

FORMAT_VERSION = 1
LOGITS = "logits"
FEATURE_PREFIX = "feat:"
# Names of the stored parts of top-k compressed logits; "logits" itself is stored only when dense.
_TOPK_VALUES, _TOPK_INDICES, _TOPK_REST = "logits:topk_values", "logits:topk_indices", "logits:rest"
_COMPRESS_ROWS = 65536  # rows per chunk while compressing: bounds the float64 scratch memory


def _update_with_tensors(h: "hashlib._Hash", named: Iterable[tuple[str, Tensor]]) -> None:
    """Name, dtype, shape and raw bytes of each tensor, in sorted-name order (dict order is no content)."""
    for name, t in sorted(named, key=lambda item: item[0]):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the class name and the state_dict: same weights, same cached outputs.

    Works for plain modules and for the `GraphModule` that `ExportedProgram.module()` returns
    (the form a teacher takes when loaded from MLflow's pt2 artefacts). Only weights and buffers
    are hashed, not forward code: two architectures with identical state_dicts (a swapped
    activation, a changed dropout rate) share a fingerprint, so fold such config into the key's
    other fields if it can change under fixed weights.
    """
    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    _update_with_tensors(h, model.state_dict().items())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class CacheKey:
    """Everything the cached teacher outputs depend on; `digest()` names the cache file.

    `taps` are feature paths as `named_modules()` spells them; their order is irrelevant to the
    digest (the same layers give the same outputs). `top_k=None` stores dense logits.
    """

    teacher_fingerprint: str
    dataset_fingerprint: str
    transform: str = "identity"
    taps: tuple[str, ...] = ()
    top_k: int | None = None

    def __post_init__(self) -> None:
        for name in ("teacher_fingerprint", "dataset_fingerprint", "transform"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"CacheKey.{name} must be a non-empty string, got {value!r}")
        if isinstance(self.taps, str):
            raise TypeError(f"CacheKey.taps must be a sequence of paths, not the string {self.taps!r}")
        object.__setattr__(self, "taps", tuple(self.taps))
        if not all(isinstance(p, str) and p for p in self.taps):
            raise ValueError(f"CacheKey.taps must be non-empty strings, got {self.taps!r}")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"CacheKey.top_k must be a positive int or None, got {self.top_k!r}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "teacher_fingerprint": self.teacher_fingerprint,
            "dataset_fingerprint": self.dataset_fingerprint,
            "transform": self.transform,
            "taps": sorted(set(self.taps)),
            "top_k": self.top_k,
        }

    def digest(self) -> str:
        """Stable across processes and Python versions: sha256 of canonical JSON, format version included."""
        text = json.dumps({"format": FORMAT_VERSION, **self.as_dict()}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def output_names(self) -> set[str]:
        """The tensor names an entry for this key holds: the logits and one per tap."""
        return {LOGITS} | {FEATURE_PREFIX + p for p in self.taps}


class _Unusable(Exception):
    """A cache file that must not be returned; the message says why."""


# -- top-k compression ---------------------------------------------------------------------------
def compress_topk(logits: Tensor, k: int) -> dict[str, Tensor]:
    """Top-k values and indices per row, plus one `rest` value standing in for every other logit.

    `rest = logsumexp(other logits) - log(C - k)`, so the C - k copies of `rest` carry the same
    total exp-mass as the logits they replace: at T=1 the row's logsumexp, hence the softmax
    probability of each top-k class, is unchanged. (At T != 1 the tail is flattened, which is the
    approximation top-k storage buys its size with.)
    """
    n, c = logits.shape
    if not 1 <= k < c:
        raise ValueError(f"top-k compression needs 1 <= k < n_classes, got k={k}, n_classes={c}")
    values, indices = logits.topk(k, dim=1)
    rest = torch.empty(n, dtype=logits.dtype)
    for start in range(0, n, _COMPRESS_ROWS):
        rows = slice(start, start + _COMPRESS_ROWS)
        others = logits[rows].double().scatter(1, indices[rows], float("-inf"))
        rest[rows] = (torch.logsumexp(others, dim=1) - math.log(c - k)).to(logits.dtype)
    index_dtype = torch.int32 if c <= torch.iinfo(torch.int32).max else torch.int64
    return {_TOPK_VALUES: values.contiguous(), _TOPK_INDICES: indices.to(index_dtype).contiguous(), _TOPK_REST: rest}


def decompress_topk(stored: dict[str, Tensor], n_classes: int) -> Tensor:
    """Dense (N, C) logits: the top-k values in place, `rest` everywhere else."""
    values, indices, rest = stored[_TOPK_VALUES], stored[_TOPK_INDICES], stored[_TOPK_REST]
    n, k = values.shape
    if indices.shape != (n, k) or rest.shape != (n,) or not 1 <= k < n_classes:
        raise ValueError(
            f"inconsistent top-k parts: values {tuple(values.shape)}, indices "
            f"{tuple(indices.shape)}, rest {tuple(rest.shape)}, n_classes {n_classes}"
        )
    if n and (int(indices.min()) < 0 or int(indices.max()) >= n_classes):
        raise ValueError(f"top-k indices outside [0, {n_classes})")
    dense = rest.to(values.dtype)[:, None].expand(n, n_classes).clone()
    return dense.scatter_(1, indices.long(), values)


# -- the cache -----------------------------------------------------------------------------------
def _normalise_outputs(key: CacheKey, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Check a compute() result against the key, and make it CPU, contiguous, autograd-free.

    A mismatch is a caller bug, so it raises rather than being cached: an entry whose contents
    disagree with its key would be served to every later run.
    """
    if not isinstance(outputs, dict):
        raise TypeError(f"compute() must return a dict of tensors, got {type(outputs).__name__}")
    expected = key.output_names()
    if set(outputs) != expected:
        raise ValueError(f"compute() returned {sorted(outputs)}, but the key calls for {sorted(expected)}")
    rows: int | None = None
    clean: dict[str, Tensor] = {}
    for name in sorted(outputs):
        t = outputs[name]
        if not isinstance(t, Tensor) or t.ndim < 1:
            raise ValueError(f"compute() output {name!r} must be a tensor with a row dimension")
        if rows is not None and t.shape[0] != rows:
            raise ValueError(f"compute() outputs disagree on the number of rows: {name!r} has {t.shape[0]}, not {rows}")
        rows = t.shape[0]
        t = t.detach().to("cpu")
        # Inference tensors cannot be saved for backward; a clone outside inference mode can.
        clean[name] = t.clone() if t.is_inference() else t.contiguous()
    logits = clean[LOGITS]
    if logits.ndim != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating (N, C) tensor, got {logits.dtype} {tuple(logits.shape)}")
    return clean


def _encode(outputs: dict[str, Tensor], top_k: int | None) -> tuple[dict[str, Tensor], dict[str, int] | None]:
    n_classes = outputs[LOGITS].shape[1]
    if top_k is None or top_k >= n_classes:
        return dict(outputs), None
    stored = {name: t for name, t in outputs.items() if name != LOGITS}
    stored.update(compress_topk(outputs[LOGITS], top_k))
    return stored, {"k": top_k, "n_classes": n_classes}


def _decode(stored: dict[str, Tensor], compression: dict[str, int] | None) -> dict[str, Tensor]:
    if compression is None:
        return dict(stored)
    out = {name: t for name, t in stored.items() if not name.startswith(LOGITS + ":")}
    out[LOGITS] = decompress_topk(stored, compression["n_classes"])
    return out


def _tensors_sha256(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    _update_with_tensors(h, tensors.items())
    return h.hexdigest()


def _describe(tensors: dict[str, Tensor]) -> dict[str, dict[str, Any]]:
    return {name: {"shape": list(t.shape), "dtype": str(t.dtype)} for name, t in tensors.items()}


class TeacherCache:
    """Teacher outputs on disk under `root`, keyed by `CacheKey`, verified on every read.

    Rows are stored in the order `compute()` returns them; the caller keeps that order aligned
    with its dataset rows (the dataset fingerprint in the key must pin that order). `hits` and
    `misses` count this instance's lookups; a corrupt entry counts as a miss.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def path_for(self, key: CacheKey) -> Path:
        return self.root / f"{key.digest()}.pt"

    def get_or_compute(self, key: CacheKey, compute: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
        """The cached outputs for `key`, or `compute()`'s, stored first.

        Both paths return the same values: with `top_k` set a miss returns the decompressed
        logits, exactly what later hits will read, so a run never depends on whether it was first.
        """
        path = self.path_for(key)
        if path.exists():
            try:
                outputs = self._read(path, key)
            except _Unusable as why:
                log.warning("teacher cache file %s is unusable (%s); deleting it and recomputing", path, why)
                try:
                    path.unlink(missing_ok=True)
                except OSError as e:
                    log.warning("could not delete teacher cache file %s: %s", path, e)
            else:
                self.hits += 1
                log.debug("teacher cache hit: %s", path)
                return outputs
        self.misses += 1
        log.debug("teacher cache miss: %s", path)
        stored, compression = _encode(_normalise_outputs(key, compute()), key.top_k)
        meta = {
            "format": FORMAT_VERSION,
            "key_digest": key.digest(),
            "key": key.as_dict(),
            "compression": compression,
            "tensors": _describe(stored),
            "sha256": _tensors_sha256(stored),
        }
        try:
            self._write(path, {"meta": meta, "tensors": stored})
        except Exception as e:  # a cache that cannot be written costs time, not correctness
            log.warning(
                "could not write teacher cache file %s (%s: %s); outputs are not cached", path, type(e).__name__, e
            )
        return _decode(stored, compression)

    def _write(self, path: Path, payload: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "xb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _read(self, path: Path, key: CacheKey) -> dict[str, Tensor]:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise _Unusable(f"cannot be loaded: {type(e).__name__}: {str(e)[:200]}") from e
        if not (
            isinstance(payload, dict)
            and isinstance(payload.get("meta"), dict)
            and isinstance(payload.get("tensors"), dict)
        ):
            raise _Unusable("not a cache entry (no meta/tensors dicts)")
        meta, stored = payload["meta"], payload["tensors"]
        if meta.get("format") != FORMAT_VERSION:
            raise _Unusable(f"format version {meta.get('format')!r}, expected {FORMAT_VERSION}")
        if meta.get("key_digest") != key.digest() or meta.get("key") != key.as_dict():
            raise _Unusable(f"written for key {meta.get('key_digest')!r}, not {key.digest()!r}")
        if not all(isinstance(t, Tensor) for t in stored.values()):
            raise _Unusable("holds values that are not tensors")
        if meta.get("tensors") != _describe(stored):
            raise _Unusable(f"tensors {_describe(stored)} do not match the header {meta.get('tensors')}")
        if meta.get("sha256") != _tensors_sha256(stored):
            raise _Unusable("tensor bytes do not match the stored sha256")
        compression = meta.get("compression")
        if compression is not None and (not isinstance(compression, dict) or compression.get("k") != key.top_k):
            raise _Unusable(f"compression {compression!r} does not match top_k={key.top_k}")
        try:
            outputs = _decode(stored, compression)
        except Exception as e:
            raise _Unusable(f"cannot be decoded: {type(e).__name__}: {e}") from e
        if set(outputs) != key.output_names():
            raise _Unusable(f"holds {sorted(outputs)}, the key calls for {sorted(key.output_names())}")
        return outputs


# -- running the teacher -------------------------------------------------------------------------
def _device_of(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def compute_teacher_outputs(
    teacher: nn.Module,
    x: Tensor,
    batch_size: int = 1024,
    features: Callable[[Tensor], dict[str, Tensor]] | None = None,
) -> dict[str, Tensor]:
    """Teacher logits for every row of `x`, in row order, as float32 on CPU: a `compute` for the cache.

    `features(x_batch)` is called right after the teacher's forward on that batch, so a hook-based
    tap can return what it recorded during that forward; its `{path: (B, ...)}` tensors are stored
    as `feat:<path>`. The teacher is put in eval mode (exported graphs, already eval, refuse the
    call): train-mode dropout or batch statistics would be frozen into the cache.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(x) == 0:
        raise ValueError("x has no rows")
    try:
        teacher.eval()
    except NotImplementedError:
        pass
    device = _device_of(teacher)
    parts: dict[str, list[Tensor]] = {}
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size].to(device)
            out = {LOGITS: teacher(xb)}
            if features is not None:
                out.update({FEATURE_PREFIX + name: t for name, t in features(xb).items()})
            for name, t in out.items():
                if not isinstance(t, Tensor) or t.ndim < 1 or t.shape[0] != len(xb):
                    raise ValueError(f"{name!r} must be a tensor with one row per input row")
                parts.setdefault(name, []).append(t.to("cpu", torch.float32) if t.is_floating_point() else t.cpu())
    # Concatenated outside inference mode: the results are ordinary tensors a loss can use.
    return {name: torch.cat(ts) for name, ts in parts.items()}
