"""Depth importance: LM loss with a layer (or a contiguous block) removed, Block Influence, and layer choice.

Removing a block is simulated by swapping its decoder layers for a pass-through module, so the same model
answers every candidate without copying weights.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from compactlm.compress.arch import decoder_layers
from compactlm.core.errors import CompactLMError


class _SkipLayer(nn.Module):
    """A decoder layer that returns its input hidden states unchanged (the residual stream passes through)."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextlib.contextmanager
def skip_layers(model, indices: Sequence[int]) -> Iterator[None]:
    """Temporarily remove the decoder layers at `indices` from the forward pass."""
    layers = decoder_layers(model)
    saved = {i: layers[i] for i in indices}
    try:
        for i in indices:
            layers[i] = _SkipLayer()
        yield
    finally:
        for i, layer in saved.items():
            layers[i] = layer


@torch.inference_mode()
def lm_loss(model, sequences: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats/token) over packed sequences."""
    total = count = 0
    for start in range(0, len(sequences), batch_size):
        loss, n = _batch_loss(model, sequences[start : start + batch_size])
        total, count = total + loss, count + n
    return total / count


class _ReplayLayer(nn.Module):
    """A decoder layer that returns a stored output: the forward up to a removed block is the base forward."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output = output

    def forward(self, hidden_states, *args, **kwargs):
        return self.output


@torch.inference_mode()
def removal_losses(
    model, sequences: torch.Tensor, block_sizes: Sequence[int], batch_size: int, progress=None
) -> tuple[float, dict[int, torch.Tensor]]:
    """Base LM loss and, for each block size k, the loss with layers [i, i+k) removed, for every start i.

    The layers before a removed block compute exactly what they compute in the base forward, so their
    output is stored once (depth set x hidden x layers floats) and replayed: a candidate only pays for the
    layers after its block and the LM head, about half a forward on average.
    """
    layers = decoder_layers(model)
    num_layers = len(layers)
    batches = [sequences[s : s + batch_size] for s in range(0, len(sequences), batch_size)]
    outputs: list[list[torch.Tensor]] = []  # [batch][layer] -> that layer's output in the base forward
    handles = [
        layer.register_forward_hook(lambda _m, _a, out, j=j: outputs[-1].__setitem__(j, out))
        for j, layer in enumerate(layers)
    ]
    try:
        total = count = 0.0
        for batch in batches:
            outputs.append([None] * num_layers)
            batch_loss, batch_count = _batch_loss(model, batch)
            total, count = total + batch_loss, count + batch_count
    finally:
        for handle in handles:
            handle.remove()
    base = total / count
    results = {}
    for k in block_sizes:
        losses = []
        for start in range(num_layers - k + 1):
            total = 0.0
            for b, batch in enumerate(batches):
                with _replaced(model, start, k, outputs[b]):
                    total += _batch_loss(model, batch)[0]
            losses.append(total / count)
            if progress is not None:
                progress()
        results[k] = torch.tensor(losses, dtype=torch.float64)
    return base, results


@contextlib.contextmanager
def _replaced(model, start: int, k: int, outputs: list[torch.Tensor]) -> Iterator[None]:
    """Remove layers [start, start+k); replay layer start-1's stored output and skip the layers before it."""
    layers = decoder_layers(model)
    saved = {i: layers[i] for i in range(start + k)}
    try:
        for i in range(start + k):
            layers[i] = _ReplayLayer(outputs[i]) if i == start - 1 else _SkipLayer()
        yield
    finally:
        for i, layer in saved.items():
            layers[i] = layer


def _batch_loss(model, batch: torch.Tensor) -> tuple[float, int]:
    logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
    targets = batch[:, 1:]
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    return loss.item(), targets.numel()


class BlockInfluence:
    """Running Block Influence, 1 - mean cosine(block input, block output) over tokens (Men et al., ShortGPT).

    Hooks see each layer boundary once; only the last max(k) boundaries are kept, so memory stays bounded.
    """

    def __init__(self, num_layers: int, block_sizes: Sequence[int]):
        self.num_layers = num_layers
        self.block_sizes = sorted(set(block_sizes))
        self.cos_sum = {k: torch.zeros(num_layers - k + 1, dtype=torch.float64) for k in self.block_sizes}
        self.tokens = 0
        self._boundaries: dict[int, torch.Tensor] = {}

    def boundary(self, index: int, hidden: torch.Tensor) -> None:
        """Hidden states at boundary `index` (0 = input of layer 0, j = output of layer j-1)."""
        hidden = hidden.detach()
        if index == 0:
            self._boundaries.clear()
            self.tokens += hidden.shape[0] * hidden.shape[1]
        for k in self.block_sizes:
            if index - k >= 0 and (index - k) in self._boundaries:
                cos = nn.functional.cosine_similarity(self._boundaries[index - k], hidden, dim=-1)
                self.cos_sum[k][index - k] += cos.double().sum().item()
        self._boundaries[index] = hidden
        self._boundaries.pop(index - max(self.block_sizes), None)

    def result(self) -> dict[int, torch.Tensor]:
        return {k: 1.0 - s / max(self.tokens, 1) for k, s in self.cos_sum.items()}


DEPTH_METRICS = ("block-loss", "layer-loss", "block-influence")


def choose_layers_to_drop(scores, num_drop: int, metric: str = "block-loss") -> list[int]:
    """Which layers to remove: the contiguous block (or the set of single layers) that hurts least.

    block-loss: the contiguous block of `num_drop` layers whose removal raises LM loss least.
    layer-loss: the `num_drop` layers whose individual removal raises LM loss least.
    block-influence: the contiguous block with the lowest Block Influence (most similar input and output).
    """
    if metric not in DEPTH_METRICS:
        raise CompactLMError(f"unknown depth metric {metric!r}; choose one of {', '.join(DEPTH_METRICS)}")
    if num_drop == 0:
        return []
    if metric == "layer-loss":
        per_layer = _need(scores.removal_loss, 1, "removal loss", metric)
        return sorted(torch.argsort(per_layer)[:num_drop].tolist())
    table = scores.removal_loss if metric == "block-loss" else scores.block_influence
    per_block = _need(table, num_drop, "removal loss" if metric == "block-loss" else "block influence", metric)
    start = int(torch.argmin(per_block))
    return list(range(start, start + num_drop))


def _need(table: dict, k: int, what: str, metric: str) -> torch.Tensor:
    if k not in table or any(math.isnan(v) for v in table[k].tolist()):
        raise CompactLMError(
            f"the importance scores have no {what} for blocks of {k} layer(s), which --depth-metric {metric} "
            f"needs: re-run importance with --block-sizes including {k}, or prune without --scores"
        )
    return table[k]
