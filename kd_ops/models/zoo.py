"""The model zoo: networks chosen by name, sized by a typed `params` mapping.

Every model takes raw flat feature rows (what a client sends to the server) and carries its
input normalisation as buffers, so the artefact in MLflow is complete on its own. Each entry
declares a pydantic params schema: a misspelled size in the YAML is a config error naming the
key, not a TypeError from a constructor.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from math import prod
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from kd_ops.core.registry import Entry, Registry, entry_decorator


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


MODELS: Registry[Entry] = Registry("model")


def register_model(name: str, params: type[Params]):
    return entry_decorator(MODELS, name, params)


class Standardize(nn.Module):
    """(x - mean) / std with statistics fitted on the training split, stored as buffers."""

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class MLPParams(Params):
    hidden: list[int] = Field(default_factory=lambda: [64], min_length=0)
    dropout: float = Field(0.0, ge=0, lt=1)


@register_model("mlp", MLPParams)
def build_mlp(p: MLPParams, input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    layers: list[nn.Module] = []
    width = prod(input_shape)
    for h in p.hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if p.dropout:
            layers.append(nn.Dropout(p.dropout))
        width = h
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


class CNNParams(Params):
    channels: list[int] = Field(default_factory=lambda: [16, 32], min_length=1)
    hidden: int = Field(64, ge=1)
    kernel_size: int = Field(3, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)


class CNN(nn.Module):
    """Conv blocks (conv, BN, ReLU, 2x2 max-pool while the map is larger than 2x2), then an MLP head."""

    def __init__(self, p: CNNParams, input_shape: tuple[int, ...], n_classes: int):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"cnn needs image-shaped input (C, H, W), got input shape {input_shape}")
        self.input_shape = tuple(input_shape)
        c, h, w = input_shape
        blocks: list[nn.Module] = []
        for out in p.channels:
            blocks += [nn.Conv2d(c, out, p.kernel_size, padding=p.kernel_size // 2), nn.BatchNorm2d(out), nn.ReLU()]
            if min(h, w) > 2:
                blocks.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = out
        self.features = nn.Sequential(*blocks)
        head: list[nn.Module] = [nn.Flatten(), nn.Linear(c * h * w, p.hidden), nn.ReLU()]
        if p.dropout:
            head.append(nn.Dropout(p.dropout))
        head.append(nn.Linear(p.hidden, n_classes))
        self.head = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.reshape(x.shape[0], *self.input_shape)))


@register_model("cnn", CNNParams)
def build_cnn(p: CNNParams, input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    return CNN(p, input_shape, n_classes)


class EmbeddingBagParams(Params):
    dim: int = Field(32, ge=1, description="embedding width of a token")
    bigram_buckets: int = Field(0, ge=0, description="hashed token-bigram embeddings (fastText's n-grams); 0: none")
    hidden: list[int] = Field(default_factory=list, description="MLP layers after the pooled embeddings")
    dropout: float = Field(0.0, ge=0, lt=1)


class TransformerParams(Params):
    dim: int = Field(64, ge=8)
    layers: int = Field(2, ge=1, le=12)
    heads: int = Field(4, ge=1)
    ff: int = Field(128, ge=8, description="width of each layer's feed-forward block")
    dropout: float = Field(0.1, ge=0, lt=1)


def _head(width: int, hidden: list[int], dropout: float, n_classes: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
        width = h
    return [*layers, nn.Linear(width, n_classes)]


def _text_table(table: Any, model: str) -> Any:
    if table is None or not table.has_text:
        raise ValueError(f"{model} reads text: it needs a table with a text column (data.text)")
    return table


@register_model("embedding_bag", EmbeddingBagParams)
def build_embedding_bag(p: EmbeddingBagParams, input_shape: tuple[int, ...], n_classes: int, table: Any = None):
    """fastText-style: mean of token (and hashed bigram) embeddings, then a linear or MLP head."""
    from kd_ops.models.text import TextBag

    bag = TextBag(_text_table(table, "embedding_bag"), p.dim, p.bigram_buckets)
    return nn.Sequential(bag, *_head(bag.width, p.hidden, p.dropout, n_classes))


@register_model("transformer", TransformerParams)
def build_transformer(p: TransformerParams, input_shape: tuple[int, ...], n_classes: int, table: Any = None):
    """A small transformer encoder over the text column, mean-pooled, then a linear head."""
    from kd_ops.models.text import TextEncoder

    if p.dim % p.heads:
        raise ValueError(f"transformer: dim {p.dim} is not a multiple of heads {p.heads}")
    encoder = TextEncoder(_text_table(table, "transformer"), p.dim, p.layers, p.heads, p.ff, p.dropout)
    return nn.Sequential(encoder, nn.Linear(encoder.width, n_classes))


TEXT_MODELS = ("embedding_bag", "transformer")  # they read a table's text columns themselves


def build_model(
    name: str,
    params: dict,
    input_shape: tuple[int, ...],
    n_classes: int,
    mean: float = 0.0,
    std: float = 1.0,
    table: Any = None,
) -> nn.Module:
    """A registered network behind its input normalisation: `normalize` then `net`.

    With `table` (a `TableSchema`), `normalize` is the table's input layer instead
    (`kd_ops.models.tabular.TableInput`: per-column scaling, missing values, category
    embeddings; `kd_ops.models.text.TextBag` where the table has text) and the network is built
    for the width that layer puts out. The text models (`TEXT_MODELS`) read the table themselves."""
    entry = MODELS.get(name)
    p = entry.params.model_validate(params)
    if name in TEXT_MODELS:
        body = entry.build(p, tuple(input_shape), n_classes, table)
        return nn.Sequential(OrderedDict(normalize=nn.Identity(), net=body))
    if table is not None and table.has_text:  # any other network reads text as a bag of embeddings
        from kd_ops.models.text import TextBag

        front: nn.Module = TextBag(table)
        input_shape = (front.width,)
    elif table is not None:
        from kd_ops.models.tabular import TableInput

        front = TableInput(table)
        input_shape = (front.width,)
    else:
        front = Standardize(mean, std)
    body = entry.build(p, tuple(input_shape), n_classes)
    return nn.Sequential(OrderedDict(normalize=front, net=body))


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients, for good.

    Sets each submodule's `training` flag directly rather than calling `eval()`: a model loaded
    from MLflow's `pt2` format (torch.export) refuses `eval()`, and its graph already has eval
    semantics, so the flag is all there is to set.
    """
    for module in model.modules():
        module.training = False
    model.requires_grad_(False)
    return model


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def serialized_size(model: nn.Module) -> int:
    """Bytes of the saved state_dict: what the weights cost on disk or over the wire."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes
