"""A network's embedding of its input: what its classification head reads.

Embedding drift (`monitors.signals`) compares the served student's embeddings of the window's
rows with those of the reference rows. The embedding is the input of the network's last linear
layer (the head): for a text student the pooled bag of token embeddings (`TextBag`) or the
transformer's mean-pooled output (`TextEncoder`), beside the table's other columns; for an MLP
its last hidden layer. It is read with a forward pre-hook on the head of the network's module
tree, so no model needs code of its own to expose it; a registered `pt2` model is loaded with its
module tree (`torch.export.unflatten`) for that.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn


def head_path(model: nn.Module) -> str | None:
    """The module path of the network's head: the last module (in `named_modules` order, which
    is the order of definition) that holds a two-dimensional `weight` of its own. None if none."""
    found = None
    for path, module in model.named_modules():
        weight = dict(module.named_parameters(recurse=False)).get("weight")
        if weight is not None and weight.dim() == 2 and path:
            found = path
    return found


class Embedder:
    """Encoded rows -> the network's embeddings (float32, (n, width)), in batches, no gradients."""

    def __init__(self, model: nn.Module, batch_size: int = 1024):
        path = head_path(model)
        if path is None:
            raise ValueError("the network has no linear head whose input could serve as its embedding")
        self.model, self.path, self.batch_size = model, path, batch_size
        self.head = dict(model.named_modules())[path]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        seen: list[torch.Tensor] = []

        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            seen.append(args[0].detach().reshape(args[0].shape[0], -1))

        handle = self.head.register_forward_pre_hook(record)
        try:
            with torch.inference_mode():
                for start in range(0, len(x), self.batch_size):
                    batch = np.ascontiguousarray(x[start : start + self.batch_size], dtype=np.float32)
                    self.model(torch.from_numpy(batch))
        finally:
            handle.remove()
        if not seen:
            return np.zeros((0, 0), dtype=np.float32)
        return torch.cat(seen).float().numpy()


def load_embedder(uri: str, allow_pickle: bool = False) -> Callable[[np.ndarray], np.ndarray] | None:
    """Encoded rows -> the embeddings of registered model `uri`: a network's head input
    (`Embedder`), a pretrained text encoder's sentence embeddings (its `embed`); None for a model
    with neither (a scikit-learn or boosted model)."""
    from kd_ops.models.loading import _flavors, _load_torch_local, _local_copy
    from kd_ops.models.table_flavor import is_table_model, read_model_folder

    local = _local_copy(uri)
    folder = is_table_model(local)
    if folder is not None:
        table = read_model_folder(folder, uri, allow_pickle, module_tree=True)
        if callable(getattr(table.inner, "embed", None)):
            return table.inner.embed
        model = table.inner if isinstance(table.inner, nn.Module) else None
    elif "pytorch" in _flavors(local):
        model = _load_torch_local(local, uri, module_tree=True, allow_pickle=allow_pickle)
    else:
        model = None
    if model is None or head_path(model) is None:
        return None
    return Embedder(model)
