"""The input layer of a network on a table: per-column scaling, missing values and category embeddings.

A table's encoded rows (`kd_ops.data.tables`) carry numbers as they are, categories as indices
into the training vocabulary, and NaN for anything missing or unseen. `TableInput` turns them
into what an MLP wants, with everything it learnt from the training split held as buffers, so
the exported network (`torch.export`, pt2) is complete on its own and a served model takes the
encoded rows of raw records:

- numeric and boolean columns: (x - mean) / std; NaN -> 0 (the training mean), plus one
  "was missing" input per column that had missing values in training;
- categorical columns: an embedding per column, of width min(16, (categories + 1) // 2 + 1);
  index 0 is shared by missing and unseen values, index 1 by categories rarer than
  `min_category_count` in training, so a rare value does not get an embedding it cannot learn.
"""

from __future__ import annotations

import torch
from torch import nn

from kd_ops.data.tables import TableSchema

MAX_EMBEDDING = 16


def embedding_width(n_categories: int) -> int:
    return int(min(MAX_EMBEDDING, (n_categories + 1) // 2 + 1))


class TableInput(nn.Module):
    """Encoded table rows (batch, columns) -> dense features (batch, `width`)."""

    def __init__(self, schema: TableSchema, skip_text: bool = False):
        """`skip_text`: leave text columns to the model that reads them (`kd_ops.models.text`)."""
        super().__init__()
        if schema.has_text and not skip_text:
            raise ValueError("TableInput does not read text columns; kd_ops.models.text's networks do")
        dense = schema.of_kind("numeric") + schema.of_kind("boolean")
        dense.sort()
        self.register_buffer("dense_index", torch.tensor([schema.offset(j) for j in dense], dtype=torch.long))
        cols = [schema.columns[i] for i in dense]
        self.register_buffer("mean", torch.tensor([c.mean for c in cols], dtype=torch.float32))
        self.register_buffer("std", torch.tensor([c.std for c in cols], dtype=torch.float32))
        flagged = [k for k, c in enumerate(cols) if c.missing_share > 0]
        self.register_buffer("flag_index", torch.tensor(flagged, dtype=torch.long))
        self.categorical = [schema.offset(j) for j in schema.of_kind("categorical")]
        self.embeddings = nn.ModuleList()
        for j, at in zip(schema.of_kind("categorical"), self.categorical):
            col = schema.columns[j]
            # vocabulary index -> embedding row: 0 missing/unseen, 1 rare, 2.. frequent categories
            frequent = [i for i, n in enumerate(col.counts) if n >= schema.min_category_count]
            remap = torch.ones(len(col.categories) + 1, dtype=torch.long)
            remap[0] = 0
            for row, i in enumerate(frequent):
                remap[i + 1] = row + 2
            self.register_buffer(f"remap_{at}", remap)
            self.embeddings.append(nn.Embedding(len(frequent) + 2, embedding_width(len(frequent) + 2)))
        self.width = len(dense) + len(flagged) + sum(e.embedding_dim for e in self.embeddings)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense = x.index_select(1, self.dense_index)
        missing = torch.isnan(dense)
        scaled = torch.where(missing, torch.zeros_like(dense), (dense - self.mean) / self.std)
        parts = [scaled, missing.index_select(1, self.flag_index).to(x.dtype)]
        for emb, j in zip(self.embeddings, self.categorical):
            code = x[:, j]
            index = torch.where(torch.isnan(code), torch.zeros_like(code), code + 1).long()
            parts.append(emb(getattr(self, f"remap_{j}")[index]))
        return torch.cat(parts, dim=1)
