"""The teacher-output cache: hits across runs, misses on any key change, corrupt files never served."""

from __future__ import annotations

import dataclasses
import logging
import math
import os

import pytest
import torch
from torch import nn

from kd_ops.distill import cache as cache_mod
from kd_ops.distill.cache import CacheKey, TeacherCache, compute_teacher_outputs, model_fingerprint

N_ROWS = 40


def _teacher(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5)).eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(N_ROWS, 8, generator=torch.Generator().manual_seed(1))


class Counted:
    """A compute() that counts its calls: a hit must not run the teacher."""

    def __init__(self, teacher: nn.Module, x: torch.Tensor, taps: tuple[str, ...] = ()):
        self.teacher, self.x, self.taps, self.calls = teacher, x, taps, 0

    def __call__(self) -> dict[str, torch.Tensor]:
        self.calls += 1
        # Stand-in features, one per tap: the hidden layer read directly (no hooks needed here).
        hidden = self.teacher[:2]
        feats = (lambda xb: {p: hidden(xb) for p in self.taps}) if self.taps else None
        return compute_teacher_outputs(self.teacher, self.x, batch_size=16, features=feats)


def _key(teacher: nn.Module, **changes) -> CacheKey:
    return dataclasses.replace(CacheKey(model_fingerprint(teacher), "data-abc"), **changes)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


# -- hits and misses -----------------------------------------------------------------------------
def test_miss_then_hit_in_this_run_and_the_next(tmp_path, x):
    teacher = _teacher()
    key, compute = _key(teacher), Counted(teacher, x)
    c = TeacherCache(tmp_path / "cache")

    first = c.get_or_compute(key, compute)
    assert (compute.calls, c.hits, c.misses) == (1, 0, 1)
    assert c.path_for(key).is_file() and c.path_for(key).name == f"{key.digest()}.pt"
    assert first["logits"].shape == (N_ROWS, 5) and first["logits"].dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(first["logits"], teacher(x), rtol=0, atol=0)

    second = c.get_or_compute(key, compute)
    assert (compute.calls, c.hits, c.misses) == (1, 1, 1)
    _assert_same(first, second)

    next_run = TeacherCache(tmp_path / "cache")  # a new process on the same root
    third = next_run.get_or_compute(key, compute)
    assert compute.calls == 1 and (next_run.hits, next_run.misses) == (1, 0)
    _assert_same(first, third)
    assert not first["logits"].is_inference() and not third["logits"].requires_grad


def _bump_weight(teacher: nn.Module) -> CacheKey:
    with torch.no_grad():
        teacher[0].weight += 1
    return _key(teacher)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(_bump_weight, id="teacher-weights"),
        pytest.param(lambda t: _key(t, dataset_fingerprint="data-xyz"), id="dataset"),
        pytest.param(lambda t: _key(t, transform="jitter(0.1)"), id="transform"),
        pytest.param(lambda t: _key(t, taps=("0",)), id="taps"),
        pytest.param(lambda t: _key(t, top_k=3), id="top_k"),
    ],
)
def test_any_key_change_is_a_miss(tmp_path, x, change):
    teacher = _teacher()
    c = TeacherCache(tmp_path)
    base = _key(teacher)
    c.get_or_compute(base, Counted(teacher, x))

    changed = change(teacher)
    assert changed.digest() != base.digest() and c.path_for(changed) != c.path_for(base)
    compute = Counted(teacher, x, taps=changed.taps)
    out = c.get_or_compute(changed, compute)
    assert compute.calls == 1 and c.misses == 2 and c.hits == 0
    assert set(out) == changed.output_names()
    assert c.get_or_compute(changed, compute) is not None and compute.calls == 1  # and now it is cached


def test_key_digest_is_stable_and_ignores_tap_order():
    a = CacheKey("t" * 16, "d", taps=("net.1", "net.3"), top_k=4)
    assert a.digest() == CacheKey("t" * 16, "d", taps=["net.3", "net.1"], top_k=4).digest()
    assert a.digest() == a.digest() and len(a.digest()) >= 16
    assert a.digest() != CacheKey("t" * 16, "d", taps=("net.1",), top_k=4).digest()
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError):
            CacheKey("t", "d", top_k=bad)
    with pytest.raises(TypeError):
        CacheKey("t", "d", taps="net.1")
    with pytest.raises(ValueError):
        CacheKey("t", "")


def test_compute_output_that_disagrees_with_the_key_is_rejected_not_cached(tmp_path, x):
    teacher = _teacher()
    c = TeacherCache(tmp_path)
    key = _key(teacher, taps=("0",))
    with pytest.raises(ValueError, match="key calls for"):
        c.get_or_compute(key, Counted(teacher, x))  # no features computed for the tap
    assert not c.path_for(key).exists()


# -- corrupt entries -----------------------------------------------------------------------------
def _truncate(path, other):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path, other):
    path.write_bytes(os.urandom(3000))


def _alter_tensor_bytes(path, other):
    payload = torch.load(path, weights_only=True)
    values = payload["tensors"].get("logits", payload["tensors"].get("logits:topk_values"))
    values[0, 0] += 1.0  # still a well-formed, loadable entry
    torch.save(payload, path)


def _entry_of_another_key(path, other):
    path.write_bytes(other.read_bytes())


class _Sneaky:
    """Pickled code: a full unpickle would call `_mark`; weights_only loading must refuse it."""

    def __reduce__(self):
        return (_mark, ())


MARKS: list[int] = []


def _mark():
    MARKS.append(1)
    return {}


def _pickled_code(path, other):
    payload = torch.load(path, weights_only=True)
    payload["meta"]["extra"] = _Sneaky()
    torch.save(payload, path)


@pytest.mark.parametrize(
    "damage,reason",
    [
        (_truncate, "cannot be loaded"),
        (_garbage, "cannot be loaded"),
        (_alter_tensor_bytes, "sha256"),
        (_entry_of_another_key, "written for key"),
        (_pickled_code, "cannot be loaded"),
    ],
)
@pytest.mark.parametrize("top_k", [None, 2])
def test_corrupt_entry_is_detected_logged_recomputed_and_rewritten(tmp_path, x, caplog, damage, reason, top_k):
    teacher = _teacher()
    c = TeacherCache(tmp_path)
    key, other_key = _key(teacher, top_k=top_k), _key(teacher, dataset_fingerprint="other", top_k=top_k)
    compute = Counted(teacher, x)
    good = c.get_or_compute(key, compute)
    c.get_or_compute(other_key, Counted(_teacher(seed=7), x))
    path = c.path_for(key)

    damage(path, c.path_for(other_key))
    with caplog.at_level(logging.WARNING, logger="kd_ops.distill.cache"):
        again = c.get_or_compute(key, compute)
    assert compute.calls == 2, "a damaged entry must be recomputed, never returned"
    warnings = [r for r in caplog.records if r.name == "kd_ops.distill.cache" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage() and reason in warnings[0].getMessage()
    _assert_same(good, again)
    assert not MARKS, "the cache must never run pickled code"

    fresh = TeacherCache(tmp_path)
    _assert_same(good, fresh.get_or_compute(key, compute))
    assert compute.calls == 2 and fresh.hits == 1, "the rewritten entry is a hit"


def test_leftover_temp_file_is_never_read_as_an_entry(tmp_path, x):
    teacher = _teacher()
    key, compute = _key(teacher), Counted(teacher, x)
    path = TeacherCache(tmp_path).path_for(key)
    # What a writer killed between torch.save and os.replace leaves behind: a complete,
    # well-formed entry with wrong values under a temp name, and a half-written one.
    ref = TeacherCache(tmp_path / "ref")
    ref.get_or_compute(key, lambda: {"logits": torch.zeros(N_ROWS, 5)})
    stale = path.with_name(f".{path.name}.0123abcd.tmp")
    stale.write_bytes(ref.path_for(key).read_bytes())
    path.with_name(f".{path.name}.4567ef.tmp").write_bytes(stale.read_bytes()[:100])

    c = TeacherCache(tmp_path)
    out = c.get_or_compute(key, compute)
    assert compute.calls == 1 and c.misses == 1
    assert not torch.equal(out["logits"], torch.zeros(N_ROWS, 5))
    assert TeacherCache(tmp_path).get_or_compute(key, compute) is not None and compute.calls == 1


def test_failed_write_leaves_no_entry_and_no_temp_file(tmp_path, x, caplog, monkeypatch):
    teacher = _teacher()
    key, compute = _key(teacher), Counted(teacher, x)
    c = TeacherCache(tmp_path)

    def half_then_fail(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(cache_mod.torch, "save", half_then_fail)
    with caplog.at_level(logging.WARNING, logger="kd_ops.distill.cache"):
        out = c.get_or_compute(key, compute)
    assert out["logits"].shape == (N_ROWS, 5) and "disk full" in caplog.text
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    c.get_or_compute(key, compute)
    assert compute.calls == 2 and c.path_for(key).is_file()


# -- top-k compression ---------------------------------------------------------------------------
def test_topk_keeps_top_values_and_total_softmax_mass(tmp_path):
    torch.manual_seed(0)
    n, n_classes, k = 64, 100, 5
    logits = torch.randn(n, n_classes) * 4
    c = TeacherCache(tmp_path)
    key = CacheKey("teacher", "data", top_k=k)
    out = c.get_or_compute(key, lambda: {"logits": logits.clone()})["logits"]
    assert out.shape == (n, n_classes) and out.dtype == torch.float32

    values, idx = logits.topk(k, dim=1)
    assert torch.equal(out.gather(1, idx), values), "top-k logits are kept exactly"
    others = torch.ones_like(logits, dtype=torch.bool).scatter(1, idx, False)
    rest = out[others].reshape(n, n_classes - k)
    assert torch.equal(rest, rest[:, :1].expand_as(rest)), "every other class gets the row's one rest value"
    expected_rest = torch.logsumexp(logits.double().masked_fill(~others, -math.inf), 1) - math.log(n_classes - k)
    torch.testing.assert_close(rest[:, 0].double(), expected_rest, rtol=0, atol=1e-5)

    torch.testing.assert_close(torch.logsumexp(out, 1), torch.logsumexp(logits, 1), rtol=0, atol=1e-5)
    mass_top = torch.softmax(out, 1).gather(1, idx)
    torch.testing.assert_close(mass_top, torch.softmax(logits, 1).gather(1, idx), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.softmax(out, 1).sum(1), torch.ones(n), rtol=0, atol=1e-5)

    stored = torch.load(c.path_for(key), weights_only=True)["tensors"]
    assert "logits" not in stored
    assert stored["logits:topk_values"].shape == (n, k) and stored["logits:rest"].shape == (n,)
    assert stored["logits:topk_indices"].dtype in (torch.int32, torch.int64)

    hit = TeacherCache(tmp_path).get_or_compute(key, lambda: pytest.fail("must be a hit"))["logits"]
    assert torch.equal(hit, out), "a hit returns what the miss returned"


@pytest.mark.parametrize("k", [5, 50])
def test_topk_at_or_above_class_count_stores_dense_logits(tmp_path, k):
    logits = torch.randn(10, 5)
    c = TeacherCache(tmp_path)
    key = CacheKey("teacher", "data", top_k=k)
    assert torch.equal(c.get_or_compute(key, lambda: {"logits": logits})["logits"], logits)
    stored = torch.load(c.path_for(key), weights_only=True)["tensors"]
    assert set(stored) == {"logits"}


# -- fingerprints and the compute helper ---------------------------------------------------------
def test_fingerprint_of_module_and_exported_graph(x):
    teacher = _teacher()
    fp = model_fingerprint(teacher)
    assert fp == model_fingerprint(_teacher()) and len(fp) >= 16
    assert fp != model_fingerprint(_teacher(seed=1))

    graph = torch.export.export(teacher.eval(), (x,)).module()
    gfp = model_fingerprint(graph)
    assert gfp == model_fingerprint(graph) == model_fingerprint(torch.export.export(teacher, (x,)).module())
    with torch.no_grad():
        next(iter(graph.parameters())).add_(1.0)
    assert model_fingerprint(graph) != gfp


def test_fingerprint_sees_buffers():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    before = model_fingerprint(model)
    model[1].running_mean += 0.5
    assert model_fingerprint(model) != before


def test_compute_teacher_outputs_batches_and_features(x):
    teacher = _teacher()
    with torch.no_grad():
        full = teacher(x)
    seen: list[int] = []

    def features(xb: torch.Tensor) -> dict[str, torch.Tensor]:
        seen.append(len(xb))
        return {"0": teacher[0](xb)}

    out = compute_teacher_outputs(teacher, x, batch_size=16, features=features)
    assert seen == [16, 16, 8]
    assert set(out) == {"logits", "feat:0"}
    torch.testing.assert_close(out["logits"], full)
    torch.testing.assert_close(out["feat:0"], teacher[0](x).detach())
    assert all(t.dtype == torch.float32 and not t.is_inference() for t in out.values())

    # The pt2 form refuses eval(), which is fine; its batch dimension must be dynamic to batch at all.
    batch = torch.export.Dim("batch")
    graph = torch.export.export(teacher, (x,), dynamic_shapes=({0: batch},)).module()
    torch.testing.assert_close(compute_teacher_outputs(graph, x, batch_size=7)["logits"], full)
