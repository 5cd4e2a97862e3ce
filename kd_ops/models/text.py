"""Networks that read text columns: a fastText-style bag of embeddings and a small transformer.

Both take a table's encoded rows (`kd_ops.data.tables`), where a text column is a block of
`max_length` token ids padded with 0 (`kd_ops.data.text`), and both put the table's other columns
through `TableInput` beside the text, so a text column is one more column of a table:

- `TextBag` (Joulin et al. 2017, "Bag of tricks for efficient text classification"): the mean of
  the embeddings of a text's subword tokens and, with `bigram_buckets`, of its hashed token
  bigrams. A handful of matrix reads per text: microseconds at batch 1.
- `TextEncoder`: token and learnt position embeddings, then PyTorch's own
  `nn.TransformerEncoder` (pre-norm, padding masked), mean-pooled over the real tokens.

An empty text (no tokens) pools to zeros in both; the transformer attends to its first (padding)
slot only, so no row is all-masked (which would make attention NaN).
"""

from __future__ import annotations

import torch
from torch import nn

from kd_ops.data.tables import TableSchema
from kd_ops.models.tabular import TableInput

BIGRAM_PRIME = 1_000_003


def text_columns(schema: TableSchema) -> list[int]:
    found = schema.of_kind("text")
    if not found:
        raise ValueError("this model reads text: the table needs a text column (data.text)")
    return found


def vocab_size(schema: TableSchema, j: int) -> int:
    return schema.tokenizer(schema.columns[j].name).get_vocab_size()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the slots where `mask` is true; zeros for a row with none."""
    weights = mask.to(values.dtype).unsqueeze(-1)
    return (values * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class TextBag(nn.Module):
    """Encoded rows -> per text column the mean of its token (and hashed bigram) embeddings,
    beside `TableInput` of the other columns: (batch, `width`)."""

    def __init__(self, schema: TableSchema, dim: int = 32, bigram_buckets: int = 0):
        super().__init__()
        self.texts = text_columns(schema)
        self.spans = [(schema.offset(j), schema.columns[j].max_length) for j in self.texts]
        self.vocab = [vocab_size(schema, j) for j in self.texts]
        self.buckets = int(bigram_buckets)
        self.embeddings = nn.ModuleList(
            nn.EmbeddingBag(v + self.buckets, dim, mode="sum", padding_idx=0) for v in self.vocab
        )
        self.rest = TableInput(schema, skip_text=True)
        self.width = dim * len(self.texts) + self.rest.width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [self.rest(x)] if self.rest.width else []
        for emb, (start, length), vocab in zip(self.embeddings, self.spans, self.vocab):
            ids = torch.nan_to_num(x[:, start : start + length]).long()
            tokens = ids
            if self.buckets:
                a, b = ids[:, :-1], ids[:, 1:]
                bigram = vocab + (a * BIGRAM_PRIME + b) % self.buckets
                tokens = torch.cat([ids, torch.where((a > 0) & (b > 0), bigram, torch.zeros_like(bigram))], dim=1)
            n = (tokens > 0).sum(dim=1, keepdim=True).clamp_min(1).to(x.dtype)
            parts.append(emb(tokens) / n)
        return torch.cat(parts, dim=1)


class TextEncoder(nn.Module):
    """Encoded rows -> the mean-pooled output of a transformer encoder over the (first) text
    column, beside `TableInput` of the other columns: (batch, `width`)."""

    def __init__(
        self, schema: TableSchema, dim: int = 64, layers: int = 2, heads: int = 4, ff: int = 128, dropout: float = 0.1
    ):
        super().__init__()
        j = text_columns(schema)[0]
        if len(schema.of_kind("text")) > 1:
            raise ValueError("the transformer reads one text column; give the others to an embedding_bag model")
        self.start, self.length = schema.offset(j), schema.columns[j].max_length
        self.tokens = nn.Embedding(vocab_size(schema, j), dim, padding_idx=0)
        self.positions = nn.Parameter(torch.zeros(1, self.length, dim))
        nn.init.normal_(self.positions, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, ff, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.rest = TableInput(schema, skip_text=True)
        self.width = dim + self.rest.width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = torch.nan_to_num(x[:, self.start : self.start + self.length]).long()
        real = ids > 0
        first = torch.zeros_like(real)
        first[:, 0] = True
        attend = real | (first & ~real.any(dim=1, keepdim=True))  # an empty text attends to one slot
        h = self.encoder(self.tokens(ids) + self.positions, src_key_padding_mask=~attend)
        pooled = _masked_mean(self.norm(h), real)
        return torch.cat([pooled, self.rest(x)], dim=1) if self.rest.width else pooled
