"""Evaluation: held-out LM loss and perplexity on packed sequences."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from compactlm.compress.depth import lm_loss


@dataclass(frozen=True)
class Perplexity:
    loss: float
    """Mean next-token cross-entropy, nats per token."""
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf


def perplexity(model, sequences: torch.Tensor, batch_size: int = 4) -> Perplexity:
    """Held-out loss and perplexity of `model` on `sequences` [N, L] (every position but the first scored)."""
    loss = lm_loss(model, sequences, batch_size)
    return Perplexity(loss=loss, tokens=int(sequences.shape[0] * (sequences.shape[1] - 1)))


def count_model_params(model) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
