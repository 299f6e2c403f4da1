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


def kd_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean per-token forward KL(p_teacher^T || p_student^T) * T^2 over all predicted positions."""
    s = student_logits[:, :-1].reshape(-1, student_logits.shape[-1])
    t = teacher_logits[:, :-1].reshape(-1, teacher_logits.shape[-1])
    total = s.new_zeros((), dtype=torch.float32)
    for start in range(0, s.shape[0], CHUNK_ROWS):
        s_log = F.log_softmax(s[start : start + CHUNK_ROWS].float() / temperature, dim=-1)
        t_log = F.log_softmax(t[start : start + CHUNK_ROWS].float() / temperature, dim=-1)
        total = total + F.kl_div(s_log, t_log, log_target=True, reduction="sum")
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
