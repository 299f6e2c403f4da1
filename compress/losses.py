"""Distillation and training losses.

- `kd_logits`: forward KL(teacher || student) on temperature-softened distributions, times T^2 (Hinton et al.),
  the Minitron logit loss;
- `kd_topk`: the same from a teacher's cached top-k logits (the teacher distribution renormalized over its
  top-k tokens; the student's log-probabilities are full-vocabulary ones gathered at those tokens);
- `hidden_state`: 1 - cosine (default) or normalized MSE between mapped student and teacher hidden states;
- `cross_entropy`: next-token CE on the labels (conventional training, teacher correction).

All take [batch, seq, ...] tensors and predict position t+1 from position t (the last position is dropped).
Vocab-sized softmaxes are computed in chunks of rows so that memory stays bounded at long sequences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ROWS = 2048
"""Token rows per chunk of a vocabulary-sized softmax."""


def cross_entropy(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy."""
    logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    return F.cross_entropy(logits.float(), input_ids[:, 1:].reshape(-1))


class _ForwardKL(torch.autograd.Function):
    """sum over rows of KL(softmax(t/T) || softmax(s/T)), with its gradient computed in the forward.

    d/ds = (softmax(s/T) - softmax(t/T)) / T is known in closed form, so the forward keeps just that one
    [rows, vocab] tensor and the backward only scales it. Autograd's log_softmax + kl_div would materialize and
    differentiate several vocabulary-sized temporaries: on CPU, allocating them dominated the loss's cost.
    """

    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
        if temperature != 1.0:
            s, t = s / temperature, t / temperature
        t_log = F.log_softmax(t, dim=-1)
        p_t = t_log.exp()
        loss = torch.dot(p_t.view(-1), t_log.view(-1))  # sum p_t log p_t, no elementwise temporary
        del t_log
        s_log = F.log_softmax(s, dim=-1)
        loss = loss - torch.dot(p_t.view(-1), s_log.view(-1))
        grad = s_log.exp_().sub_(p_t)  # softmax(s) - p_t, in place of s_log
        if temperature != 1.0:
            grad.div_(temperature)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None


def kd_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean per-token forward KL(p_teacher^T || p_student^T) * T^2 over all predicted positions."""
    s = student_logits[:, :-1].reshape(-1, student_logits.shape[-1])
    t = teacher_logits[:, :-1].reshape(-1, teacher_logits.shape[-1]).detach()
    total = s.new_zeros((), dtype=torch.float32)
    for start in range(0, s.shape[0], CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        total = total + _ForwardKL.apply(s[rows].float(), t[rows].float(), float(temperature))
    return total / s.shape[0] * temperature**2


def kd_topk(
    student_logits: torch.Tensor, top_values: torch.Tensor, top_indices: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Forward KL from cached teacher top-k logits: teacher renormalized over its top-k, student full-vocab.

    `top_values`/`top_indices` are [batch, seq, k] for every position of the sequence (the last is unused).
    """
    s = student_logits[:, :-1].reshape(-1, student_logits.shape[-1])
    values = top_values[:, :-1].reshape(-1, top_values.shape[-1])
    indices = top_indices[:, :-1].reshape(-1, top_indices.shape[-1]).long()
    total = s.new_zeros((), dtype=torch.float32)
    for start in range(0, s.shape[0], CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        s_log = F.log_softmax(s[rows].float() / temperature, dim=-1).gather(-1, indices[rows])
        t_log = F.log_softmax(values[rows].float() / temperature, dim=-1)
        total = total + (t_log.exp() * (t_log - s_log)).sum()
    return total / s.shape[0] * temperature**2


def hidden_state(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Distance between (already mapped) student hidden states and the teacher's, averaged over tokens."""
    student, teacher = student.float(), teacher.float()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    if kind == "mse":  # normalized by the teacher's energy, so that layers of different scale weigh alike
        return ((student - teacher).pow(2).sum(-1) / teacher.pow(2).sum(-1).clamp_min(1e-6)).mean()
    raise ValueError(f"unknown hidden-state loss {kind!r}")
