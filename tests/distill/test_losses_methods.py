"""DKD, RKD, PKT, attention transfer, FitNets hints and CRD against independent computations.

Every value check recomputes the loss from the paper's definition in NumPy / plain Python
loops (float64), never by calling the code under test. Gradient checks: the student gets a
finite gradient (and matches finite differences where the loss is a pure function), the
teacher gets none.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from kd_ops.distill.losses import kd_loss
from kd_ops.distill.losses.attention import attention_loss, attention_map
from kd_ops.distill.losses.crd import CRDLoss
from kd_ops.distill.losses.dkd import dkd_loss
from kd_ops.distill.losses.hint import HintLoss
from kd_ops.distill.losses.pkt import pkt_loss
from kd_ops.distill.losses.rkd import rkd_angle_loss, rkd_distance_loss


def _t(a: np.ndarray, grad: bool = False) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64, requires_grad=grad)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def _huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1.0 else abs(x) - 0.5


def _assert_student_only_gradient(loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor) -> None:
    loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0
    assert teacher.grad is None, "no gradient may reach the teacher"


# --------------------------------------------------------------------------------------- DKD


def _dkd_reference(s: np.ndarray, t: np.ndarray, y: np.ndarray, temp: float) -> tuple[float, float]:
    """(TCKD, NCKD) at temperature `temp`, batch means, *without* the T² factor; row by row."""
    tckd, nckd = [], []
    for row_s, row_t, label in zip(s, t, y):
        ps, pt = _softmax(row_s / temp), _softmax(row_t / temp)
        bs = np.array([ps[label], 1.0 - ps[label]])
        bt = np.array([pt[label], 1.0 - pt[label]])
        tckd.append(float((bt * np.log(bt / bs)).sum()))
        others = [c for c in range(len(row_s)) if c != label]
        qs = ps[others] / ps[others].sum()
        qt = pt[others] / pt[others].sum()
        nckd.append(float((qt * np.log(qt / qs)).sum()))
    return float(np.mean(tckd)), float(np.mean(nckd))


def _dkd_data(seed: int = 0, batch: int = 6, classes: int = 5):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(batch, classes)) * 2
    t = rng.normal(size=(batch, classes)) * 2
    y = rng.integers(0, classes, size=batch)
    return s, t, y


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("alpha,beta", [(1.0, 8.0), (0.5, 2.0), (1.0, 0.0), (0.0, 1.0)])
def test_dkd_matches_independent_computation(temp, alpha, beta):
    s, t, y = _dkd_data()
    loss = dkd_loss(_t(s), _t(t), torch.tensor(y), temp, alpha, beta)
    tckd, nckd = _dkd_reference(s, t, y, temp)
    assert loss.item() == pytest.approx(temp**2 * (alpha * tckd + beta * nckd), rel=1e-10)


def test_dkd_target_only_is_tckd_and_carries_t_squared():
    s, t, y = _dkd_data(seed=1)
    tckd1, _ = _dkd_reference(s, t, y, 1.0)
    assert dkd_loss(_t(s), _t(t), torch.tensor(y), 1.0, 1.0, 0.0).item() == pytest.approx(tckd1, rel=1e-10)
    temp = 3.0
    tckd3, nckd3 = _dkd_reference(s, t, y, temp)
    target_only = dkd_loss(_t(s), _t(t), torch.tensor(y), temp, 1.0, 0.0).item()
    nontarget_only = dkd_loss(_t(s), _t(t), torch.tensor(y), temp, 0.0, 1.0).item()
    assert target_only == pytest.approx(9.0 * tckd3, rel=1e-10)
    assert nontarget_only == pytest.approx(9.0 * nckd3, rel=1e-10)


def test_dkd_recovers_hinton_kd_with_coupled_weight():
    """The paper's decomposition: KD = TCKD + (1 - p_teacher(target)) · NCKD, row by row."""
    s, t, y = _dkd_data(seed=2)
    temp = 4.0
    for row in range(len(y)):
        p_target = _softmax(t[row] / temp)[y[row]]
        args = (_t(s[row : row + 1]), _t(t[row : row + 1]))
        dkd = dkd_loss(*args, torch.tensor(y[row : row + 1]), temp, 1.0, 1.0 - p_target)
        assert dkd.item() == pytest.approx(kd_loss(*args, temp).item(), rel=1e-9)


def test_dkd_zero_for_identical_logits():
    s, _, y = _dkd_data(seed=3)
    assert dkd_loss(_t(s), _t(s.copy()), torch.tensor(y), 4.0, 1.0, 8.0).item() == pytest.approx(0.0, abs=1e-12)


def test_dkd_gradient_student_only_and_matches_finite_differences():
    s, t, y = _dkd_data(seed=4, batch=4, classes=4)
    student, teacher = _t(s, grad=True), _t(t, grad=True)
    target = torch.tensor(y)
    _assert_student_only_gradient(dkd_loss(student, teacher, target, 2.0, 1.0, 8.0), student, teacher)
    assert torch.autograd.gradcheck(lambda x: dkd_loss(x, _t(t), target, 2.0, 1.0, 8.0), (_t(s, grad=True),))


def test_dkd_stays_finite_when_teacher_is_certain():
    """log(1 - p) would give -inf for a saturated target probability; the logsumexp form does not."""
    s = torch.tensor([[50.0, 0.0, -3.0]], requires_grad=True)
    t = torch.tensor([[80.0, 0.0, 1.0]])
    loss = dkd_loss(s, t, torch.tensor([0]), 1.0, 1.0, 8.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_dkd_rejects_bad_shapes():
    z = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="same shape"):
        dkd_loss(z, torch.zeros(3, 5), torch.zeros(3, dtype=torch.long), 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="one integer class index per row"):
        dkd_loss(z, z, torch.zeros(2, dtype=torch.long), 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="at least two classes"):
        dkd_loss(torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(3, dtype=torch.long), 1.0, 1.0, 1.0)


# --------------------------------------------------------------------------------------- RKD


def _rkd_distance_reference(s: np.ndarray, t: np.ndarray) -> tuple[float, int]:
    """Loss and how many pairs fell in Huber's linear branch (so tests can check both branches)."""
    pairs = [(i, j) for i in range(len(s)) for j in range(len(s)) if i != j]

    def normalised(e):
        d = np.array([np.sqrt(((e[i] - e[j]) ** 2).sum()) for i, j in pairs])
        return d / d.mean()

    diffs = normalised(s) - normalised(t)
    return float(np.mean([_huber(x) for x in diffs])), int((np.abs(diffs) >= 1).sum())


def _rkd_angle_reference(s: np.ndarray, t: np.ndarray) -> float:
    def cos(e, i, j, k):
        u, v = e[i] - e[j], e[k] - e[j]
        return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))

    triplets = list(itertools.permutations(range(len(s)), 3))
    return float(np.mean([_huber(cos(s, *tr) - cos(t, *tr)) for tr in triplets]))


def _relational_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(6, 4))
    t = rng.normal(size=(6, 7))  # a different width: relations do not care
    t[0] += 40.0  # an outlier, so some normalised distances differ by more than 1 (linear Huber)
    return s, t


def test_rkd_distance_matches_independent_computation():
    s, t = _relational_data()
    value, linear = _rkd_distance_reference(s, t)
    assert linear > 0, "the data must exercise Huber's linear branch too"
    assert rkd_distance_loss(_t(s), _t(t)).item() == pytest.approx(value, rel=1e-9)


def test_rkd_angle_matches_independent_computation():
    s, t = _relational_data(seed=1)
    assert rkd_angle_loss(_t(s), _t(t)).item() == pytest.approx(_rkd_angle_reference(s, t), rel=1e-10)


@pytest.mark.parametrize("loss_fn", [rkd_distance_loss, rkd_angle_loss])
def test_rkd_zero_for_same_geometry(loss_fn):
    _, t = _relational_data()
    assert loss_fn(_t(t), _t(t.copy())).item() == pytest.approx(0.0, abs=1e-12)
    # both terms are invariant to scale and translation of the embedding
    assert loss_fn(_t(3.0 * t + 1.5), _t(t)).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("loss_fn", [rkd_distance_loss, rkd_angle_loss])
def test_rkd_gradient_student_only_and_matches_finite_differences(loss_fn):
    s, t = _relational_data(seed=2)
    student, teacher = _t(s, grad=True), _t(t, grad=True)
    _assert_student_only_gradient(loss_fn(student, teacher), student, teacher)
    assert torch.autograd.gradcheck(lambda x: loss_fn(x, _t(t[:4])), (_t(s[:4], grad=True),))


@pytest.mark.parametrize("loss_fn", [rkd_distance_loss, rkd_angle_loss])
def test_rkd_flattens_extra_dims_and_checks_batch(loss_fn):
    rng = np.random.default_rng(3)
    s, t = rng.normal(size=(5, 2, 3)), rng.normal(size=(5, 4, 1, 2))
    flat = loss_fn(_t(s.reshape(5, -1)), _t(t.reshape(5, -1)))
    assert loss_fn(_t(s), _t(t)).item() == pytest.approx(flat.item(), rel=1e-12)
    with pytest.raises(ValueError, match="same batch size"):
        loss_fn(_t(s), _t(t[:4]))


def test_rkd_coincident_points_keep_gradients_finite():
    e = torch.zeros(4, 3, dtype=torch.float64)
    e[2] = e[3] = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    student = e.clone().requires_grad_(True)
    teacher = torch.randn(4, 3, dtype=torch.float64)
    (rkd_distance_loss(student, teacher) + rkd_angle_loss(student, teacher)).backward()
    assert torch.isfinite(student.grad).all()


# --------------------------------------------------------------------------------------- PKT


def _pkt_reference(s: np.ndarray, t: np.ndarray, eps: float = 1e-7) -> float:
    def conditional(e):
        n = len(e)
        unit = [row / (np.sqrt((row**2).sum()) + eps) for row in e]
        k = [[(float(unit[i] @ unit[j]) + 1.0) / 2.0 for j in range(n)] for i in range(n)]
        return [[k[i][j] / sum(k[i]) for j in range(n)] for i in range(n)]

    p, q = conditional(s), conditional(t)
    n = len(s)
    rows = [sum(q[i][j] * np.log((q[i][j] + eps) / (p[i][j] + eps)) for j in range(n)) for i in range(n)]
    return float(np.mean(rows))


def test_pkt_matches_independent_computation():
    s, t = _relational_data(seed=4)
    assert pkt_loss(_t(s), _t(t)).item() == pytest.approx(_pkt_reference(s, t), rel=1e-10)


def test_pkt_zero_for_identical_embeddings_and_positive_otherwise():
    s, t = _relational_data(seed=5)
    assert pkt_loss(_t(t), _t(t.copy())).item() == pytest.approx(0.0, abs=1e-15)
    # cosine-based: a positive rescaling of the student changes nothing
    assert pkt_loss(_t(2.5 * t), _t(t)).item() == pytest.approx(0.0, abs=1e-12)
    assert pkt_loss(_t(s), _t(t)).item() > 0


def test_pkt_gradient_student_only_and_matches_finite_differences():
    s, t = _relational_data(seed=6)
    student, teacher = _t(s, grad=True), _t(t, grad=True)
    _assert_student_only_gradient(pkt_loss(student, teacher), student, teacher)
    assert torch.autograd.gradcheck(lambda x: pkt_loss(x, _t(t)), (_t(s, grad=True),))


def test_pkt_checks_batch():
    with pytest.raises(ValueError, match="same batch size"):
        pkt_loss(torch.zeros(3, 2), torch.zeros(4, 2))


# --------------------------------------------------------------------------------- attention


def _attention_map_reference(f: np.ndarray, p: float) -> np.ndarray:
    out = []
    for sample in f:  # (C, H, W)
        energy = np.mean([np.abs(ch) ** p for ch in sample], axis=0).ravel()
        out.append(energy / np.sqrt((energy**2).sum()))
    return np.array(out)


def _attention_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    students = [rng.normal(size=(3, 4, 5, 5)), rng.normal(size=(3, 8, 2, 3))]
    teachers = [rng.normal(size=(3, 6, 5, 5)), rng.normal(size=(3, 16, 2, 3))]
    return students, teachers


@pytest.mark.parametrize("p", [1.0, 2.0, 4.0])
def test_attention_map_and_loss_match_independent_computation(p):
    students, teachers = _attention_data()
    np.testing.assert_allclose(attention_map(_t(students[0]), p).numpy(), _attention_map_reference(students[0], p))
    per_pair = [
        np.mean((_attention_map_reference(s, p) - _attention_map_reference(t, p)) ** 2)
        for s, t in zip(students, teachers)
    ]
    loss = attention_loss([_t(s) for s in students], [_t(t) for t in teachers], p)
    assert loss.item() == pytest.approx(float(np.mean(per_pair)), rel=1e-10)


def test_attention_zero_for_identical_features():
    _, teachers = _attention_data(seed=1)
    loss = attention_loss([_t(t) for t in teachers], [_t(t.copy()) for t in teachers])
    assert loss.item() == pytest.approx(0.0, abs=1e-15)


def test_attention_gradient_student_only_and_matches_finite_differences():
    students, teachers = _attention_data(seed=2)
    s = [_t(x, grad=True) for x in students]
    t = [_t(x, grad=True) for x in teachers]
    attention_loss(s, t).backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in s)
    assert all(x.grad is None for x in t), "no gradient may reach the teacher"
    small = _t(students[1][:2, :3], grad=True)
    fixed = _t(teachers[1][:2])
    assert torch.autograd.gradcheck(lambda x: attention_loss([x], [fixed]), (small,))


def test_attention_spatial_mismatch_names_both_shapes():
    with pytest.raises(ValueError) as err:
        attention_loss([torch.zeros(2, 8, 4, 4)], [torch.zeros(2, 16, 2, 2)])
    assert str(err.value) == "attention transfer needs the same spatial size: student (8, 4, 4) vs teacher (16, 2, 2)"


def test_attention_rejects_unpaired_lists():
    with pytest.raises(ValueError, match="number of feature maps"):
        attention_loss([torch.zeros(2, 8, 4, 4)], [])


# -------------------------------------------------------------------------------------- hint


def test_hint_connector_types():
    conv = HintLoss((8, 4, 4), (16, 4, 4)).connector
    assert isinstance(conv, torch.nn.Conv2d)
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (8, 16, (1, 1))
    linear = HintLoss((10,), (32,)).connector
    assert isinstance(linear, torch.nn.Linear) and (linear.in_features, linear.out_features) == (10, 32)


@pytest.mark.parametrize(
    "student_shape,teacher_shape",
    [((8, 4, 4), (16, 2, 2)), ((8, 4, 4), (64,)), ((64,), (8, 4, 4)), ((3, 4), (3, 4))],
)
def test_hint_unconnectable_shapes_name_both(student_shape, teacher_shape):
    with pytest.raises(ValueError) as err:
        HintLoss(student_shape, teacher_shape)
    assert str(student_shape) in str(err.value) and str(teacher_shape) in str(err.value)


def test_hint_value_matches_independent_computation():
    torch.manual_seed(0)
    hint = HintLoss((3, 2, 2), (5, 2, 2)).double()
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(4, 3, 2, 2)), rng.normal(size=(4, 5, 2, 2))
    w = hint.connector.weight.detach().numpy()[:, :, 0, 0]  # (5, 3)
    b = hint.connector.bias.detach().numpy()
    mapped = np.einsum("oc,bchw->bohw", w, s) + b[None, :, None, None]
    assert hint(_t(s), _t(t)).item() == pytest.approx(float(np.mean((mapped - t) ** 2)), rel=1e-12)

    flat = HintLoss((3,), (2,)).double()
    s2, t2 = rng.normal(size=(5, 3)), rng.normal(size=(5, 2))
    w2, b2 = flat.connector.weight.detach().numpy(), flat.connector.bias.detach().numpy()
    assert flat(_t(s2), _t(t2)).item() == pytest.approx(float(np.mean((s2 @ w2.T + b2 - t2) ** 2)), rel=1e-12)


def test_hint_gradients_reach_student_and_connector_not_teacher():
    hint = HintLoss((3, 2, 2), (5, 2, 2))
    student = torch.randn(2, 3, 2, 2, requires_grad=True)
    teacher = torch.randn(2, 5, 2, 2, requires_grad=True)
    _assert_student_only_gradient(hint(student, teacher), student, teacher)
    assert hint.connector.weight.grad is not None


def test_hint_loss_decreases_when_training_the_connector():
    torch.manual_seed(0)
    hint = HintLoss((4, 3, 3), (6, 3, 3))
    student = torch.randn(8, 4, 3, 3)
    teacher = torch.randn(8, 6, 3, 3)
    opt = torch.optim.SGD(hint.parameters(), lr=0.1)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = hint(student, teacher)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_hint_forward_checks_shapes():
    hint = HintLoss((10,), (32,))
    with pytest.raises(ValueError, match=r"built for student \(10,\)"):
        hint(torch.zeros(2, 11), torch.zeros(2, 32))


# --------------------------------------------------------------------------------------- CRD


def _normalise_rows(a: np.ndarray) -> np.ndarray:
    return a / np.sqrt((a**2).sum(axis=1, keepdims=True))


def _crd_reference(crd: CRDLoss, s, t, index, negatives) -> tuple[float, np.ndarray, np.ndarray]:
    """Loss and the memory banks expected after the update, from the module's weights before forward."""
    ws, bs = crd.embed_student.weight.detach().numpy(), crd.embed_student.bias.detach().numpy()
    wt, bt = crd.embed_teacher.weight.detach().numpy(), crd.embed_teacher.bias.detach().numpy()
    mem_s, mem_t = crd.memory_student.numpy().copy(), crd.memory_teacher.numpy().copy()
    vs, vt = _normalise_rows(s @ ws.T + bs), _normalise_rows(t @ wt.T + bt)
    tau = crd.temperature
    total = 0.0
    for b in range(len(s)):
        for anchor, other, memory in ((vs[b], vt[b], mem_t), (vt[b], vs[b], mem_s)):
            logits = [float(anchor @ other) / tau] + [float(anchor @ memory[n]) / tau for n in negatives[b]]
            m = max(logits)
            log_z = m + np.log(sum(np.exp(x - m) for x in logits))
            total += 0.5 * (log_z - logits[0])
    loss = total / len(s)
    new_s, new_t = mem_s.copy(), mem_t.copy()
    for b, i in enumerate(index):
        new_s[i] = _normalise_rows((crd.momentum * mem_s[i] + (1 - crd.momentum) * vs[b])[None])[0]
        new_t[i] = _normalise_rows((crd.momentum * mem_t[i] + (1 - crd.momentum) * vt[b])[None])[0]
    return loss, new_s, new_t


def _crd_setup(seed: int = 0):
    torch.manual_seed(seed)
    crd = CRDLoss(student_dim=6, teacher_dim=9, n_data=20, feat_dim=5, n_negatives=7).double()
    rng = np.random.default_rng(seed)
    s, t = rng.normal(size=(4, 6)), rng.normal(size=(4, 9))
    index = np.array([3, 0, 17, 19])
    return crd, s, t, index


def test_crd_value_and_memory_update_match_independent_computation_with_sampled_negatives():
    crd, s, t, index = _crd_setup()
    torch.manual_seed(123)
    negatives = crd.sample_negatives(torch.tensor(index)).numpy()
    value, new_s, new_t = _crd_reference(crd, s, t, index, negatives)
    torch.manual_seed(123)  # the same draw happens inside forward
    loss = crd(_t(s), _t(t), torch.tensor(index))
    assert loss.item() == pytest.approx(value, rel=1e-10)
    np.testing.assert_allclose(crd.memory_student.numpy(), new_s, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(crd.memory_teacher.numpy(), new_t, rtol=1e-12, atol=1e-14)


def test_crd_explicit_negatives_match_independent_computation():
    crd, s, t, index = _crd_setup(seed=1)
    negatives = np.array([[1, 2, 2], [5, 6, 7], [0, 19, 4], [18, 1, 3]])
    value, _, _ = _crd_reference(crd, s, t, index, negatives)
    assert crd(_t(s), _t(t), torch.tensor(index), torch.tensor(negatives)).item() == pytest.approx(value, rel=1e-10)


def test_crd_memory_rows_at_index_change_and_others_do_not():
    crd, s, t, index = _crd_setup(seed=2)
    before_s, before_t = crd.memory_student.clone(), crd.memory_teacher.clone()
    loss = crd(_t(s), _t(t), torch.tensor(index))
    assert torch.isfinite(loss)
    others = torch.tensor([i for i in range(crd.n_data) if i not in set(index.tolist())])
    for before, after in ((before_s, crd.memory_student), (before_t, crd.memory_teacher)):
        assert (before[index] - after[index]).abs().amax(dim=1).min() > 0, "every indexed row changes"
        assert torch.equal(before[others], after[others])
        torch.testing.assert_close(after.norm(dim=1), torch.ones(crd.n_data, dtype=torch.float64))


def test_crd_eval_mode_leaves_memory_alone():
    crd, s, t, index = _crd_setup(seed=3)
    crd.eval()
    before = crd.memory_student.clone(), crd.memory_teacher.clone()
    crd(_t(s), _t(t), torch.tensor(index))
    assert torch.equal(before[0], crd.memory_student) and torch.equal(before[1], crd.memory_teacher)


def test_crd_gradients_reach_student_and_heads_not_teacher_and_survive_memory_update():
    crd, s, t, index = _crd_setup(seed=4)
    student, teacher = _t(s, grad=True), _t(t, grad=True)
    first = crd(student, teacher, torch.tensor(index))
    second = crd(student, teacher, torch.tensor(index))  # memory written twice before backward
    (first + second).backward()  # would raise if an in-place update invalidated saved tensors
    assert student.grad is not None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert teacher.grad is None, "no gradient may reach the teacher"
    assert crd.embed_student.weight.grad is not None and crd.embed_student.weight.grad.abs().sum() > 0
    assert crd.embed_teacher.weight.grad is not None, "the teacher head is trained as in the paper"
    assert not crd.memory_student.requires_grad and not crd.memory_teacher.requires_grad


def test_crd_sampler_is_in_range_and_never_returns_the_positive():
    crd = CRDLoss(student_dim=2, teacher_dim=2, n_data=5, n_negatives=4096)
    assert crd.n_negatives == 4, "clipped to n_data - 1"
    index = torch.tensor([0, 4, 2, 2])
    neg = crd.sample_negatives(index, generator=torch.Generator().manual_seed(0))
    assert neg.shape == (4, 4)
    assert (neg >= 0).all() and (neg < 5).all()
    assert (neg != index[:, None]).all()
    # uniform over the other rows: every allowed value shows up in a large draw
    big = crd.sample_negatives(torch.full((500,), 2), generator=torch.Generator().manual_seed(1))
    assert set(big.unique().tolist()) == {0, 1, 3, 4}


def test_crd_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least 2"):
        CRDLoss(2, 2, n_data=1)
    crd = CRDLoss(2, 3, n_data=10, n_negatives=3)
    with pytest.raises(ValueError, match="one index per sample"):
        crd(torch.zeros(2, 2), torch.zeros(2, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match="index must lie"):
        crd(torch.zeros(2, 2), torch.zeros(2, 3), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="negatives must"):
        crd(torch.zeros(2, 2), torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([[1, 2], [3, 11]]))
