"""Depth importance: LM loss or task accuracy with a layer (or a contiguous block) removed, Block Influence, and
layer choice.

Removing a block is simulated by swapping its decoder layers for a pass-through module, so the same model
answers every candidate without copying weights.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

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
    """Base LM loss and, for each block size k, the loss with layers [i, i+k) removed, for every start i."""
    batches = [sequences[s : s + batch_size] for s in range(0, len(sequences), batch_size)]

    def loss(results: list[tuple[float, int]]) -> tuple[float]:
        return (sum(r[0] for r in results) / sum(r[1] for r in results),)

    base, table = removal_scores(model, batches, block_sizes, _batch_loss, loss, progress)
    return base[0], {k: v[:, 0] for k, v in table.items()}


@torch.inference_mode()
def removal_scores(
    model,
    batches: Sequence,
    block_sizes: Sequence[int],
    run: Callable,
    reduce: Callable[[list], tuple[float, ...]],
    progress=None,
) -> tuple[tuple[float, ...], dict[int, torch.Tensor]]:
    """A score of the base model and, for each block size k, of the model with layers [i, i+k) removed, for
    every start i: `reduce([run(model, batch) for batch in batches])`, a tuple of floats (loss; accuracy, margin).

    The layers before a removed block compute exactly what they compute in the base forward, so their output is
    stored once and replayed: a candidate only pays for the layers after its block and the LM head, about half a
    forward on average. Only the outputs a candidate replays are kept (layers 0 .. L - min(k) - 1): batches x
    tokens x hidden x those layers floats.
    """
    layers = decoder_layers(model)
    num_layers = len(layers)
    kept = num_layers - min(block_sizes)  # a block starting at i replays layer i - 1's output; i <= L - k
    outputs: list[list[torch.Tensor]] = []  # [batch][layer] -> that layer's output in the base forward
    handles = [
        layer.register_forward_hook(lambda _m, _a, out, j=j: outputs[-1].__setitem__(j, out))
        for j, layer in enumerate(layers[:kept])
    ]
    try:
        base_results = []
        for batch in batches:
            outputs.append([None] * num_layers)
            base_results.append(run(model, batch))
    finally:
        for handle in handles:
            handle.remove()
    base = reduce(base_results)
    table = {}
    for k in block_sizes:
        scores = []
        for start in range(num_layers - k + 1):
            results = []
            for b, batch in enumerate(batches):
                with _replaced(model, start, k, outputs[b]):
                    results.append(run(model, batch))
            scores.append(reduce(results))
            if progress is not None:
                progress()
        table[k] = torch.tensor(scores, dtype=torch.float64).reshape(len(scores), -1)
    return base, table


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
TASK_METRIC = "task:"
"""`task:NAME`: the contiguous block whose removal keeps the accuracy on task NAME highest (the paper's choice)."""


def depth_task(metric: str) -> str | None:
    """The task a depth metric scores by (`task:NAME`), None for the loss and influence metrics; refuses unknown
    metrics and unknown tasks, listing what exists."""
    if metric in DEPTH_METRICS:
        return None
    if not metric.startswith(TASK_METRIC):
        raise CompactLMError(
            f"unknown depth metric {metric!r}; choose one of {', '.join(DEPTH_METRICS)} or task:NAME "
            "(NAME one of the bundled tasks, e.g. task:winowhy)"
        )
    from compactlm.compress.tasks import TASKS, resolve_task_names

    name = metric[len(TASK_METRIC) :]
    if name not in TASKS:
        resolve_task_names([name])  # the error that lists the bundled tasks
        raise CompactLMError(f"--depth-metric task:NAME takes one task, one of {', '.join(TASKS)}; not {name!r}")
    return name


@torch.inference_mode()
def task_removals(
    model, examples: Sequence, batches: Sequence, block_sizes: Sequence[int], progress=None
) -> tuple[tuple[float, float], dict[int, torch.Tensor]]:
    """(accuracy, margin) of the base model on a multiple-choice task and, per block size k, [starts, 2]: the same
    with layers [i, i+k) removed (compactlm.compress.tasks: `batches` from `choice_batches`)."""
    from compactlm.compress.tasks import grade, logprob_sums

    def reduce(results: list) -> tuple[float, float]:
        result = grade(examples, batches, results)
        return result.accuracy, result.margin

    return removal_scores(model, batches, block_sizes, logprob_sums, reduce, progress)


def choose_layers_to_drop(scores, num_drop: int, metric: str = "block-loss") -> list[int]:
    """Which layers to remove: the contiguous block (or the set of single layers) that hurts least.

    block-loss: the contiguous block of `num_drop` layers whose removal raises LM loss least.
    layer-loss: the `num_drop` layers whose individual removal raises LM loss least.
    block-influence: the contiguous block with the lowest Block Influence (most similar input and output).
    task:NAME: the contiguous block whose removal leaves the highest accuracy on task NAME; among blocks of equal
    accuracy (a few dozen examples give few distinct values), the one with the largest margin of right answers.
    """
    task = depth_task(metric)
    if num_drop == 0:
        return []
    if task is not None:
        table = scores.task_removal.get(task, {})
        if num_drop not in table:
            raise CompactLMError(
                f"the importance scores have no {task} accuracy for blocks of {num_drop} layer(s), which "
                f"--depth-metric {metric} needs: re-run importance with --depth-task {task} and --block-sizes "
                f"including {num_drop}, or prune without --scores"
            )
        accuracy, margin = table[num_drop][:, 0].tolist(), table[num_drop][:, 1].tolist()
        start = min(range(len(accuracy)), key=lambda i: (-accuracy[i], -margin[i], i))
        return list(range(start, start + num_drop))
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
