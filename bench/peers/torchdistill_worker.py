"""torchdistill's side of `bench/peer_torchdistill.py`: one KD student trained with torchdistill 1.1.5.

Runs in its own venv (bench/.venv-torchdistill, see bench/peers/README.md) and imports nothing of
kd-ops, so what is measured is torchdistill's loop and loss, not ours. The folder it is given holds
everything kd-ops used for the same (dataset, seed): the teacher kd-ops trained (a torch.export
program), the student's initial weights, the transfer/val/test rows and the hyper-parameters. The
student is trained through torchdistill's `DistillationBox` (pre_epoch_process, forward_process,
post_forward_process, post_epoch_process, as in torchdistill's examples/torchvision/
image_classification.py) with its `KDLoss` under a `WeightedSumLoss`, configured by the dict that
torchdistill's YAML `train:` section holds.

    bench/.venv-torchdistill/bin/python bench/peers/torchdistill_worker.py <folder>

Prints one JSON line: accuracy, agreement (with the teacher, test split), seconds_per_epoch, epochs,
and the same with a `cached_` prefix for a second student whose teacher logits are looked up
instead of computed each step (kd-ops' teacher-output cache, which torchdistill 1.1.5 lacks).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, RandomSampler, TensorDataset


def import_torchvision() -> None:
    """Import torchvision (torchdistill imports it for its model zoo) even when its C ops cannot load.

    pip can pair a CPU build of torch (a CPU wheel index) with PyPI's CUDA build of torchvision, whose
    `_C.so` needs libtorch_cuda. torchvision then skips its C ops, except that 0.28 registers fake
    kernels for `torchvision::nms` and `torchvision::qnms` without checking, and the import fails.
    Declaring those two schemas lets it finish; nothing in this benchmark calls torchvision's ops.
    """
    try:
        import torchvision  # noqa: F401
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        for op in ("nms", "qnms"):
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision  # noqa: F401


class Standardize(nn.Module):
    """(x - mean) / std with buffers `mean` and `std`: kd-ops' input layer, so its state_dict loads as is."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def build_student(input_dim: int, hidden: list[int], n_classes: int, mean: float, std: float) -> nn.Module:
    """kd-ops' MLP student in plain torch, with the same module names (`normalize`, `net.0`, ...)."""
    layers: list[nn.Module] = []
    width = input_dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(OrderedDict(normalize=Standardize(mean, std), net=nn.Sequential(*layers)))


def train_config(hp: dict, generator: torch.Generator) -> dict:
    """What torchdistill's YAML `train:` section would hold for kd-ops' KD recipe.

    The sampler and the loader share one generator seeded as kd-ops' DataLoader(shuffle=True,
    generator=...) is, so both students see the same batches in the same order. torchdistill's
    loader builder needs the sampler as a class (`class_or_func`, YAML's `!import_get`), not a name.
    """
    return {
        "num_epochs": hp["epochs"],
        "train_data_loader": {
            "dataset_id": "transfer",
            "sampler": {"class_or_func": RandomSampler, "kwargs": {"generator": generator}},
            "kwargs": {"batch_size": hp["batch_size"], "num_workers": 0, "generator": generator},
        },
        # 1.1.5's get_forward_proc_func has no default for a missing `forward_proc` (None raises).
        "teacher": {"forward_proc": "forward_batch_only", "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only"},
        "optimizer": {"key": "AdamW", "kwargs": {"lr": hp["lr"], "weight_decay": hp["weight_decay"]}},
        "scheduler": {"key": "CosineAnnealingLR", "kwargs": {"T_max": hp["epochs"]}, "scheduling_step": 0},
        "criterion": {
            "key": "WeightedSumLoss",
            "kwargs": {
                "sub_terms": {
                    "kd": {
                        "criterion": {
                            "key": "KDLoss",
                            "kwargs": {
                                "student_module_path": ".",
                                "student_module_io": "output",
                                "teacher_module_path": ".",
                                "teacher_module_io": "output",
                                "temperature": hp["temperature"],
                                "alpha": hp["ce_weight"],
                                "beta": hp["kd_weight"],
                                "reduction": "batchmean",
                            },
                        },
                        "weight": 1.0,
                    }
                }
            },
        },
    }


class CachedTeacher(nn.Module):
    """The teacher's logits looked up, not computed: kd-ops reads them from its teacher-output cache
    when inputs do not change between steps, and torchdistill 1.1.5 has no such cache, so this
    second arm gives torchdistill the same advantage through its own hook (forward_proc
    `forward_batch_supp_dict`), to tell the loops' cost apart from the teacher's."""

    def forward(self, sample_batch: torch.Tensor, supp_dict: dict) -> torch.Tensor:
        return supp_dict["teacher_logits"]


class WithTeacherLogits(Dataset):
    """(x, y, {"teacher_logits": ...}) rows: the supplementary dict torchdistill's loop hands on."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor):
        self.x, self.y, self.logits = x, y, logits

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], {"teacher_logits": self.logits[i]}


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch: int = 1024) -> np.ndarray:
    return torch.cat([model(torch.from_numpy(x[i : i + batch])) for i in range(0, len(x), batch)]).numpy()


def distil(teacher: nn.Module, transfer: Dataset, hp: dict, init: dict, val: tuple, cached: bool) -> dict:
    """One student trained by torchdistill's DistillationBox, the epoch loop of its examples.

    kd-ops validates every `val_every` epochs (about 50 times a run); so does this loop (torchdistill's
    example validates every epoch), so both loops do the same work, and validation is timed apart."""
    from torchdistill.core.distillation import get_distillation_box

    student = build_student(hp["input_dim"], hp["hidden"], hp["n_classes"], hp["mean"], hp["std"])
    student.load_state_dict(init)
    torch.manual_seed(hp["seed"] + 2)
    generator = torch.Generator().manual_seed(hp["loader_seed"])
    config = train_config(hp, generator)
    if cached:
        config["teacher"]["forward_proc"] = "forward_batch_supp_dict"
        config["train_data_loader"]["requires_supp"] = False  # the dataset brings its own supp dict
    box = get_distillation_box(teacher, student, {"transfer": transfer}, config, torch.device("cpu"), None, False, 1)
    x_val, y_val = val
    train_s = val_s = 0.0
    t0 = time.perf_counter()
    for epoch in range(box.num_epochs):
        t_epoch = time.perf_counter()
        box.pre_epoch_process(epoch=epoch)
        for sample_batch, targets, supp_dict in box.train_data_loader:
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
        train_s += time.perf_counter() - t_epoch
        if (epoch + 1) % hp["val_every"] == 0:
            t_val = time.perf_counter()
            box.student_model.eval()
            float((predict(box.student_model, x_val).argmax(1) == y_val).mean())
            val_s += time.perf_counter() - t_val
        box.post_epoch_process()
    total_s = time.perf_counter() - t0
    return {
        "student": box.student_model.eval(),
        "seconds_per_epoch": total_s / box.num_epochs,
        "train_seconds_per_epoch": train_s / box.num_epochs,
        "val_seconds_total": val_s,
        "epochs": box.num_epochs,
        "steps": box.stage_grad_count,
    }


def main(folder: Path) -> dict:
    torch.set_num_threads(1)
    import_torchvision()

    hp = json.loads((folder / "hparams.json").read_text())
    arrays = np.load(folder / "arrays.npz")
    # The exported graph is the teacher in eval mode (batch-norm running statistics); an exported
    # module refuses .eval() and .train(), and there is nothing left for them to switch.
    teacher = torch.export.load(str(folder / "teacher.pt2")).module()
    for p in teacher.parameters():
        p.requires_grad_(False)
    init = torch.load(folder / "student_init.pt", weights_only=True)
    x, y = torch.from_numpy(arrays["x_transfer"]), torch.from_numpy(arrays["y_transfer"])
    val = (arrays["x_val"], arrays["y_val"])
    x_test, y_test = arrays["x_test"], arrays["y_test"]
    teacher_pred = predict(teacher, x_test).argmax(1)

    live = distil(teacher, TensorDataset(x, y), hp, init, val, cached=False)
    t0 = time.perf_counter()
    logits = torch.from_numpy(predict(teacher, arrays["x_transfer"]))
    cache_s = time.perf_counter() - t0
    cached = distil(CachedTeacher(), WithTeacherLogits(x, y, logits), hp, init, val, cached=True)

    out = {}
    for prefix, arm in (("", live), ("cached_", cached)):
        pred = predict(arm.pop("student"), x_test).argmax(1)
        out[f"{prefix}accuracy"] = float((pred == y_test).mean())
        out[f"{prefix}agreement"] = float((pred == teacher_pred).mean())
        out[f"{prefix}test_predictions"] = pred.tolist()
        out.update({f"{prefix}{k}": v for k, v in arm.items()})
    out.update(
        teacher_cache_s=cache_s,
        teacher_accuracy=float((teacher_pred == y_test).mean()),
        torch=torch.__version__,
        torchdistill=importlib.metadata.version("torchdistill"),
    )
    return out


if __name__ == "__main__":
    out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # one JSON line on stdout, torchdistill's logs elsewhere
        result = main(Path(sys.argv[1]))
    print(json.dumps(result), file=out)
