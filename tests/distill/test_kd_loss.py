"""The Hinton KD loss against an independent NumPy computation, value and gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd_ops.distill.losses import kd_loss


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _reference(s: np.ndarray, t: np.ndarray, temp: float) -> tuple[float, np.ndarray]:
    """T² · mean over rows of KL(p_t || p_s) and its gradient T · (p_s - p_t) / B (by hand)."""
    ps, pt = _softmax(s / temp), _softmax(t / temp)
    kl = (pt * (np.log(pt) - np.log(ps))).sum(axis=1).mean()
    grad = temp * (ps - pt) / s.shape[0]
    return temp**2 * kl, grad


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0, 10.0])
def test_value_and_gradient_match_independent_computation(temp):
    rng = np.random.default_rng(0)
    s = rng.normal(size=(6, 5)) * 3
    t = rng.normal(size=(6, 5)) * 3
    student = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor(t, dtype=torch.float64, requires_grad=True)
    loss = kd_loss(student, teacher, temp)
    loss.backward()
    value, grad = _reference(s, t, temp)
    assert loss.item() == pytest.approx(value, rel=1e-10)
    np.testing.assert_allclose(student.grad.numpy(), grad, rtol=1e-9, atol=1e-12)
    assert teacher.grad is None, "no gradient may reach the teacher"


def test_t_squared_factor():
    """Without T² the soft term would shrink by 1/T²; with it, value = T² · KL at temperature T."""
    s, t = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 3.0]])
    temp = 3.0
    plain_kl = torch.nn.functional.kl_div(
        torch.log_softmax(s / temp, 1), torch.softmax(t / temp, 1), reduction="batchmean"
    )
    assert kd_loss(s, t, temp).item() == pytest.approx(9.0 * plain_kl.item(), rel=1e-6)


def test_zero_when_student_matches_teacher():
    z = torch.randn(4, 10)
    assert kd_loss(z.clone(), z, 4.0).item() == pytest.approx(0.0, abs=1e-6)
