"""Running statistics of activations: reduced over the tokens of each sample, accumulated over samples, so that
memory does not grow with the calibration set."""

from __future__ import annotations

import torch


class Accumulator:
    """Reduce [batch, seq, channels] magnitudes over seq per sample, accumulate over samples (float64)."""

    def __init__(self, channels: int, seq_agg: str, batch_agg: str):
        self.seq_agg, self.batch_agg = seq_agg, batch_agg
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.sumsq = torch.zeros(channels, dtype=torch.float64)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.float()
        if self.seq_agg == "mean":
            per_sample = x.mean(dim=1)
        elif self.seq_agg == "l2":
            per_sample = torch.linalg.vector_norm(x, dim=1)
        else:
            per_sample = x.var(dim=1, unbiased=False)
        self.add_samples(per_sample)

    def add_samples(self, per_sample: torch.Tensor) -> None:
        """Accumulate [samples, channels] values already reduced over each sample's tokens."""
        per_sample = per_sample.double()
        if self.batch_agg != "l2":
            self.sum += per_sample.sum(dim=0)
        if self.batch_agg != "mean":
            self.sumsq += per_sample.pow(2).sum(dim=0)
        self.count += per_sample.shape[0]

    def result(self) -> torch.Tensor:
        n = max(self.count, 1)
        if self.batch_agg == "mean":
            return self.sum / n
        if self.batch_agg == "l2":
            return self.sumsq.sqrt()
        return (self.sumsq / n - (self.sum / n) ** 2).clamp_min(0.0)
