"""Edge exports of a student: ONNX run by onnxruntime, and its dynamic int8 quantization.

A student is distilled to run somewhere small; these are the forms it would ship in. Each is
scored as a further `Candidate` with the same metrics as the torch model, so a user sees what
the export costs in accuracy and buys in size and latency before choosing it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kd_ops.evaluation.metrics import Candidate, activation_peak_bytes, tile

EDGE_KINDS = ("onnx", "onnx_int8")


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints progress to stdout and warns about absent torchvision ops; onnxruntime's
    quantizer warns on the root logger. None of it is the user's business."""
    loggers = [logging.getLogger(), logging.getLogger("torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class _Rows(nn.Module):
    """One named tensor argument, whatever the wrapped model's signature (an unflattened `pt2`
    model takes *args, which torch.export cannot give a dynamic batch dimension by name)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.model(rows)


def export_onnx(model: nn.Module, example: np.ndarray, path: str | Path) -> Path:
    """ONNX through torch.export (the dynamo exporter) with a dynamic batch dimension."""
    path = Path(path)
    x = torch.as_tensor(np.asarray(example[:2], dtype=np.float32))
    with _quiet():
        program = torch.export.export(_Rows(model), (x,), dynamic_shapes={"rows": {0: torch.export.Dim("batch")}})
        torch.onnx.export(
            program, (x,), str(path), dynamo=True, verbose=False, input_names=["rows"], external_data=False
        )
    return path


def quantize_int8(onnx_path: str | Path, out_path: str | Path) -> Path:
    """Dynamic int8: weights stored as int8, activations quantized per call (onnxruntime)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(str(onnx_path), str(out_path), weight_type=QuantType.QInt8)
    return Path(out_path)


def onnx_candidate(path: str | Path, name: str, param_count: int, activation_peak: int) -> Candidate:
    """An ONNX file in an onnxruntime CPU session.

    onnxruntime exposes no allocation counter, so peak memory is the file's bytes plus the
    source network's activation peak (the graph computes the same tensors, in float32).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    size = Path(path).stat().st_size

    def predict(x: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    return Candidate(name, predict, param_count, size, lambda x: size + activation_peak)


def edge_candidates(
    model: nn.Module,
    example: np.ndarray,
    workdir: str | Path,
    kinds: tuple[str, ...] = EDGE_KINDS,
    peak_batch: int = 256,
) -> list[tuple[Candidate, Path]]:
    """Export `model` to each kind under `workdir`; returns (candidate, file) pairs in `kinds` order."""
    from kd_ops.models.zoo import freeze, param_count

    model = freeze(model)  # exported with eval semantics (batch norm from running statistics)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    count = param_count(model)
    peak = activation_peak_bytes(model, tile(example, peak_batch))
    fp32 = export_onnx(model, example, workdir / "model.onnx")
    out = []
    for kind in kinds:
        path = fp32 if kind == "onnx" else quantize_int8(fp32, workdir / "model.int8.onnx")
        out.append((onnx_candidate(path, kind, count, peak), path))
    return out
