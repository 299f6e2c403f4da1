"""Distillation and training losses against direct torch computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import compactlm.compress.losses
from compactlm.compress.losses import cross_entropy, hidden_state, kd_logits, kd_topk

VOCAB = 40


def _logits(seed: int, batch: int = 3, seq: int = 7, vocab: int = VOCAB, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(batch, seq, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def _direct_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over predicted positions of sum_v p_t (log p_t - log p_s), times T^2, written out by hand."""
    s = torch.log_softmax(student[:, :-1].double() / temperature, dim=-1)
    t = torch.log_softmax(teacher[:, :-1].double() / temperature, dim=-1)
    per_token = (t.exp() * (t - s)).sum(-1)
    return per_token.mean() * temperature**2


def test_kd_logits_is_zero_for_identical_logits_and_positive_otherwise():
    teacher = _logits(0)
    assert kd_logits(teacher.clone(), teacher).item() == pytest.approx(0.0, abs=1e-7)
    assert kd_logits(_logits(1), teacher).item() > 0.1


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_logits_equals_a_direct_kl_over_the_full_vocabulary(temperature):
    student, teacher = _logits(1), _logits(2)
    expected = _direct_kl(student, teacher, temperature)
    assert kd_logits(student, teacher, temperature).item() == pytest.approx(expected.item(), rel=1e-5)


def test_kd_logits_ignores_the_last_position():
    student, teacher = _logits(1), _logits(2)
    changed = student.clone()
    changed[:, -1] = 100.0
    assert kd_logits(changed, teacher).item() == kd_logits(student, teacher).item()


def test_kd_losses_do_not_depend_on_the_chunking(monkeypatch):
    student, teacher = _logits(3, batch=4, seq=9), _logits(4, batch=4, seq=9)  # 32 predicted rows
    top = torch.topk(teacher, 8, dim=-1)
    monkeypatch.setattr(compactlm.compress.losses, "CHUNK_ROWS", 10_000)
    whole = kd_logits(student, teacher, 2.0).item(), kd_topk(student, top.values, top.indices, 2.0).item()
    monkeypatch.setattr(compactlm.compress.losses, "CHUNK_ROWS", 5)  # 7 chunks, the last one partial
    chunked = kd_logits(student, teacher, 2.0).item(), kd_topk(student, top.values, top.indices, 2.0).item()
    assert chunked == pytest.approx(whole, rel=1e-6)


def test_kd_logits_gradient_matches_the_direct_kl():
    student, teacher = _logits(5).requires_grad_(), _logits(6)
    kd_logits(student, teacher, 2.0).backward()
    reference = student.detach().double().requires_grad_()
    _direct_kl(reference, teacher, 2.0).backward()
    torch.testing.assert_close(student.grad, reference.grad.float(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_topk_with_k_equal_to_the_vocabulary_is_kd_logits(temperature):
    student, teacher = _logits(7), _logits(8)
    top = torch.topk(teacher, VOCAB, dim=-1)
    assert kd_topk(student, top.values, top.indices, temperature).item() == pytest.approx(
        kd_logits(student, teacher, temperature).item(), rel=1e-5
    )


def test_kd_topk_with_small_k_is_finite_and_falls_as_the_student_nears_the_teacher():
    student, teacher = _logits(9), _logits(10)
    top = torch.topk(teacher, 4, dim=-1)
    losses = [
        kd_topk(torch.lerp(student, teacher, alpha), top.values, top.indices, 2.0).item()
        for alpha in (0.0, 0.25, 0.5, 0.75, 1.0)
    ]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(a > b for a, b in zip(losses, losses[1:], strict=False)), losses
    # The teacher itself still loses the mass outside its top-k: positive, but well below the start.
    assert 0 < losses[-1] < losses[0]


def test_kd_topk_is_the_kl_of_the_renormalized_teacher_top_k():
    student, teacher = _logits(11), _logits(12)
    top = torch.topk(teacher, 5, dim=-1)
    s_log = torch.log_softmax(student[:, :-1].double(), -1).gather(-1, top.indices[:, :-1])
    t_log = torch.log_softmax(top.values[:, :-1].double(), -1)
    expected = (t_log.exp() * (t_log - s_log)).sum(-1).mean()
    assert kd_topk(student, top.values, top.indices).item() == pytest.approx(expected.item(), rel=1e-5)


def test_hidden_state_cosine_is_zero_for_identical_inputs_and_scale_free():
    x = _logits(13, vocab=16)
    assert hidden_state(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert hidden_state(3.0 * x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert hidden_state(-x, x).item() == pytest.approx(2.0, abs=1e-6)
    y = _logits(14, vocab=16)
    expected = (1 - F.cosine_similarity(x, y, dim=-1)).mean()
    assert hidden_state(x, y).item() == pytest.approx(expected.item(), rel=1e-6)


def test_hidden_state_mse_is_normalized_by_the_teachers_energy():
    teacher = _logits(15, vocab=16)
    student = teacher + 0.1 * _logits(16, vocab=16)
    expected = ((student - teacher).pow(2).sum(-1) / teacher.pow(2).sum(-1)).mean()
    assert hidden_state(student, teacher, "mse").item() == pytest.approx(expected.item(), rel=1e-5)
    # Scaling both by 10 leaves the normalized distance unchanged.
    assert hidden_state(10 * student, 10 * teacher, "mse").item() == pytest.approx(expected.item(), rel=1e-5)
    assert hidden_state(teacher, teacher.clone(), "mse").item() == 0.0
    assert hidden_state(torch.zeros_like(teacher), teacher, "mse").item() == pytest.approx(1.0, rel=1e-6)


def test_hidden_state_rejects_an_unknown_kind():
    x = _logits(17, vocab=8)
    with pytest.raises(ValueError, match="unknown hidden-state loss 'l1'"):
        hidden_state(x, x, "l1")


def test_cross_entropy_is_torch_cross_entropy_on_shifted_labels():
    logits = _logits(18)
    ids = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(19))
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    assert cross_entropy(logits, ids).item() == pytest.approx(expected.item(), rel=1e-6)
    # Not the unshifted pairing.
    unshifted = F.cross_entropy(logits.reshape(-1, VOCAB), ids.reshape(-1))
    assert cross_entropy(logits, ids).item() != pytest.approx(unshifted.item(), rel=1e-3)


def test_losses_accept_bf16_inputs_and_compute_in_fp32():
    student, teacher = _logits(20), _logits(21)
    loss = kd_logits(student.bfloat16(), teacher.bfloat16(), 2.0)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(kd_logits(student, teacher, 2.0).item(), rel=0.05)
