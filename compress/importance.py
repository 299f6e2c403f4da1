"""Activation-based importance (Minitron): one forward pass over calibration data, hooks, running statistics.

Scored at once, per the paper:
- MLP neurons: |input of down_proj| (the MLP intermediate activations);
- attention heads: the L2 norm over head_dim of each head's attention output (input of o_proj); a KV group's
  score is the sum of its heads';
- embedding channels: |RMSNorm outputs|, summed over every norm of the model;
- mixture of experts: each routed expert by the router's probability mass, how often it is picked, and the norm of
  what it adds to the residual stream (routing weight x |expert output|); each expert's FFN neurons (and the shared
  expert's) by their intermediate activations over the tokens routed to it, like a dense MLP's;
- depth: Block Influence of layers and blocks, and (extra passes) LM loss, or accuracy on a multiple-choice task,
  with each layer or block removed.

Each activation is reduced over the sequence within its sample (`seq_agg`), then accumulated over samples
(`batch_agg`) as running sums, so memory does not grow with the number of samples. The paper's best for
width is L2 over the batch, mean over the sequence: the default.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from compactlm.compress.arch import (
    ATTN_O,
    MLP_DOWN,
    SHARED,
    decoder_layers,
    family_of,
    moe_layer_indices,
    shape_of,
    submodule,
)
from compactlm.compress.depth import BlockInfluence, removal_losses, task_removals
from compactlm.compress.experts import EXPERT_METRICS, ExpertStats, hook_experts
from compactlm.compress.running import Accumulator
from compactlm.compress.tasks import choice_batches, load_task
from compactlm.core.errors import CompactLMError
from compactlm.core.io import atomic_file

AGGREGATIONS = ("mean", "l2", "var")


@dataclass
class ImportanceConfig:
    """How importance is estimated."""

    seq_agg: str = "mean"
    """Reduction over the tokens of one sample: mean, l2 or var."""
    batch_agg: str = "l2"
    """Reduction over samples: mean, l2 or var (the paper's best: l2 over batch, mean over sequence)."""
    batch_size: int = 8
    """Sequences per forward pass."""
    depth_samples: int = 8
    """How many of the calibration sequences the layer-removal losses use (each block costs a forward)."""
    block_sizes: tuple[int, ...] = (1,)
    """Contiguous block sizes scored by removal loss and Block Influence (1 = single layers)."""
    removal_loss: bool = True
    """Compute the layer-removal LM losses (extra forward passes); Block Influence is always computed."""
    depth_tasks: tuple[str, ...] = ()
    """Bundled multiple-choice tasks scored with each candidate block removed (depth by task accuracy,
    `--depth-metric task:NAME`): one forward over the task's rows per candidate, layers before the block replayed."""
    task_samples: int = 128
    """Examples of each depth task, the last of the task's fixed order (compactlm.compress.tasks.load_task(tail=True)):
    disjoint from the evaluation's first examples while the two together fit in the task."""

    def __post_init__(self):
        for name in ("seq_agg", "batch_agg"):
            if getattr(self, name) not in AGGREGATIONS:
                raise CompactLMError(f"{name} must be one of {', '.join(AGGREGATIONS)}, not {getattr(self, name)!r}")
        if self.batch_size < 1:
            raise CompactLMError("batch_size must be at least 1")
        if self.depth_samples < 1:
            raise CompactLMError("depth_samples must be at least 1")
        if self.task_samples < 1:
            raise CompactLMError("task_samples must be at least 1")
        from compactlm.compress.tasks import resolve_task_names

        self.depth_tasks = tuple(resolve_task_names(list(self.depth_tasks)))
        self.block_sizes = tuple(sorted(set(int(k) for k in self.block_sizes)))
        if not self.block_sizes or self.block_sizes[0] < 1:
            raise CompactLMError("block sizes must be positive integers")


@dataclass
class ImportanceScores:
    """Importance of every prunable unit of a model; higher means more important."""

    mlp: torch.Tensor
    """[layers, ffn_hidden_size]"""
    heads: torch.Tensor
    """[layers, num_attention_heads]"""
    hidden: torch.Tensor
    """[hidden_size]"""
    block_influence: dict[int, torch.Tensor] = field(default_factory=dict)
    """block size k -> [layers - k + 1]: 1 - cos(input of block at i, its output)."""
    removal_loss: dict[int, torch.Tensor] = field(default_factory=dict)
    """block size k -> [layers - k + 1]: LM loss with layers [i, i+k) removed."""
    base_loss: float | None = None
    task_removal: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    """task -> block size k -> [layers - k + 1, 2]: (accuracy, margin) on the task with layers [i, i+k) removed;
    the base model's are in meta["task_base"]."""
    experts: dict[str, torch.Tensor] = field(default_factory=dict)
    """Mixture of experts: metric (EXPERT_METRICS) -> [layers, experts]; rows of dense layers are zero."""
    expert_mlp: torch.Tensor | None = None
    """[layers, experts, expert ffn]: each routed expert's FFN neurons."""
    shared_mlp: torch.Tensor | None = None
    """[layers, shared expert ffn]: the shared expert's neurons (Qwen2-MoE)."""
    meta: dict = field(default_factory=dict)

    def groups(self, num_query_groups: int) -> torch.Tensor:
        """[layers, groups]: a KV group's score is the sum of its query heads' scores."""
        layers, heads = self.heads.shape
        return self.heads.view(layers, num_query_groups, heads // num_query_groups).sum(-1)

    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        tensors = {"mlp": self.mlp, "heads": self.heads, "hidden": self.hidden}
        tensors |= {f"block_influence.{k}": v for k, v in self.block_influence.items()}
        tensors |= {f"removal_loss.{k}": v for k, v in self.removal_loss.items()}
        tensors |= {f"task_removal.{t}.{k}": v for t, table in self.task_removal.items() for k, v in table.items()}
        tensors |= {f"experts.{metric}": v for metric, v in self.experts.items()}
        tensors |= {
            k: v for k, v in (("expert_mlp", self.expert_mlp), ("shared_mlp", self.shared_mlp)) if v is not None
        }
        meta = dict(self.meta, base_loss=self.base_loss)
        path = Path(path)
        with atomic_file(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"compactlm": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ImportanceScores:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = json.loads((handle.metadata() or {}).get("compactlm", "{}"))
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        except Exception as exc:
            raise CompactLMError(f"cannot read importance scores from {path}: {exc}") from exc
        if not {"mlp", "heads", "hidden"} <= tensors.keys():
            raise CompactLMError(f"{path} is not a compactlm importance file (mlp/heads/hidden missing)")
        table = lambda prefix: {  # noqa: E731
            int(k.split(".")[1]): v for k, v in tensors.items() if k.startswith(prefix + ".")
        }
        return cls(
            mlp=tensors["mlp"],
            heads=tensors["heads"],
            hidden=tensors["hidden"],
            block_influence=table("block_influence"),
            removal_loss=table("removal_loss"),
            base_loss=meta.pop("base_loss", None),
            task_removal=_task_tables(tensors),
            experts={k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("experts.")},
            expert_mlp=tensors.get("expert_mlp"),
            shared_mlp=tensors.get("shared_mlp"),
            meta=meta,
        )

    def check_matches(self, config) -> None:
        """Refuse scores computed on a model of another shape."""
        shape = shape_of(config)
        expected = {
            "mlp": (shape.num_layers, shape.ffn_hidden_size),
            "heads": (shape.num_layers, shape.num_attention_heads),
            "hidden": (shape.hidden_size,),
        }
        if shape.num_experts:
            expected |= {f"experts.{m}": (shape.num_layers, shape.num_experts) for m in EXPERT_METRICS}
            expected["expert_mlp"] = (shape.num_layers, shape.num_experts, shape.moe_ffn_hidden_size)
        if shape.shared_expert_ffn_hidden_size:
            expected["shared_mlp"] = (shape.num_layers, shape.shared_expert_ffn_hidden_size)
        for name, want in expected.items():
            value = self.experts.get(name[8:]) if name.startswith("experts.") else getattr(self, name)
            if value is None:
                raise CompactLMError(
                    f"the importance scores have no {name} scores, which this mixture-of-experts model needs "
                    f"(scores of {self.meta.get('model', 'another model')}): estimate importance on this model"
                )
            got = tuple(value.shape)
            if got != want:
                raise CompactLMError(
                    f"the importance scores do not match this model: {name} scores have shape {got}, "
                    f"the model needs {want} (scores of {self.meta.get('model', 'another model')})"
                )


def _task_tables(tensors: dict[str, torch.Tensor]) -> dict[str, dict[int, torch.Tensor]]:
    tables: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("task_removal."):
            _, task, k = key.split(".")
            tables.setdefault(task, {})[int(k)] = value
    return tables


def _norm_modules(model) -> list[torch.nn.Module]:
    """Every [hidden] norm of the model (each layer's, per its family, then the final one): embedding-channel
    importance is the aggregate of their outputs."""
    names = family_of(model.config).norms
    norms = []
    for layer in decoder_layers(model):
        norms += [getattr(layer, name) for name in names]
    norms.append(model.model.norm)
    return norms


def estimate_importance(
    model,
    sequences: torch.Tensor,
    config: ImportanceConfig | None = None,
    *,
    meta: dict | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    tokenizer=None,
) -> ImportanceScores:
    """Score MLP neurons, heads, embedding channels and layers of `model` on calibration `sequences` [N, L].

    One hooked forward pass over all sequences gives the width scores and Block Influence; the layer-removal
    losses take one more pass over `depth_samples` sequences per candidate block, and each of `depth_tasks` (which
    needs the model's `tokenizer`) one pass over `task_samples` examples' rows per candidate. `progress(stage, done,
    total)` is called as work advances.
    """
    config = config or ImportanceConfig()
    if config.depth_tasks and tokenizer is None:
        raise CompactLMError("depth importance by task accuracy needs the model's tokenizer")
    if sequences.ndim != 2 or sequences.shape[0] == 0:
        raise CompactLMError("calibration data is empty: need at least one sequence")
    shape = shape_of(model.config)
    layers = decoder_layers(model)
    num_layers = len(layers)
    for k in config.block_sizes:
        if k > num_layers:
            raise CompactLMError(f"block size {k} is larger than the model's {num_layers} layers")
    heads, head_dim = shape.num_attention_heads, shape.head_dim

    mlp_acc = [Accumulator(shape.ffn_hidden_size, config.seq_agg, config.batch_agg) for _ in range(num_layers)]
    head_acc = [Accumulator(heads, config.seq_agg, config.batch_agg) for _ in range(num_layers)]
    norms = _norm_modules(model)
    norm_acc = [Accumulator(shape.hidden_size, config.seq_agg, config.batch_agg) for _ in norms]
    influence = BlockInfluence(num_layers, config.block_sizes)
    moe = set(moe_layer_indices(model.config))
    expert_stats = {
        i: ExpertStats(shape.num_experts, shape.moe_ffn_hidden_size, config.seq_agg, config.batch_agg) for i in moe
    }
    shared_acc = {i: Accumulator(shape.shared_expert_ffn_hidden_size, config.seq_agg, config.batch_agg) for i in moe}

    def mlp_hook(acc):
        return lambda _m, args: acc.update(args[0].detach().abs())

    handles = []
    for i, layer in enumerate(layers):
        if i in moe:
            handles += hook_experts(layer, expert_stats[i])
            if shape.shared_expert_ffn_hidden_size:  # it sees the block's tokens flattened: [batch * seq, ffn]
                shared_down = submodule(layer, f"{SHARED}.down_proj")
                handles.append(
                    shared_down.register_forward_pre_hook(
                        lambda _m, args, acc=shared_acc[i], stats=expert_stats[i]: acc.update(
                            args[0].detach().abs().reshape(-1, stats.seq_len, args[0].shape[-1])
                        )
                    )
                )
        else:
            handles.append(submodule(layer, MLP_DOWN).register_forward_pre_hook(mlp_hook(mlp_acc[i])))
        handles.append(
            submodule(layer, ATTN_O).register_forward_pre_hook(
                lambda _m, args, acc=head_acc[i]: acc.update(
                    torch.linalg.vector_norm(args[0].detach().unflatten(-1, (heads, head_dim)), dim=-1)
                )
            )
        )
        if i == 0:
            handles.append(layer.register_forward_pre_hook(lambda _m, args: influence.boundary(0, args[0])))
        handles.append(
            layer.register_forward_hook(
                lambda _m, _args, out, j=i + 1: influence.boundary(j, out[0] if isinstance(out, tuple) else out)
            )
        )
    for norm, acc in zip(norms, norm_acc, strict=True):
        handles.append(norm.register_forward_hook(lambda _m, _args, out, acc=acc: acc.update(out.detach().abs())))

    started = time.perf_counter()
    total = len(sequences)
    try:
        with torch.inference_mode():
            for start in range(0, total, config.batch_size):
                # The base model only: the LM head plays no part in width importance (saves ~1/5 of the FLOPs).
                model.model(input_ids=sequences[start : start + config.batch_size], use_cache=False)
                if progress:
                    progress("width", min(start + config.batch_size, total), total)
    finally:
        for handle in handles:
            handle.remove()

    base_loss, removal = None, {}
    if config.removal_loss:
        depth_set = sequences[: config.depth_samples]
        candidates = sum(num_layers - k + 1 for k in config.block_sizes)
        done = [0]

        def tick():
            done[0] += 1
            if progress:
                progress("depth", done[0], candidates)

        base_loss, removal = removal_losses(model, depth_set, config.block_sizes, config.batch_size, tick)

    task_removal, task_meta = {}, {}
    for task in config.depth_tasks:
        examples = load_task(task, config.task_samples, tail=True)
        batches = choice_batches(model, tokenizer, examples, batch_size=16)
        candidates, done = sum(num_layers - k + 1 for k in config.block_sizes), [0]

        def tick(task=task, candidates=candidates, done=done):
            done[0] += 1
            if progress:
                progress(f"depth: {task}", done[0], candidates)

        base, task_removal[task] = task_removals(model, examples, batches, config.block_sizes, tick)
        chance = sum(x.chance for x in examples) / len(examples)
        task_meta[task] = {"accuracy": base[0], "margin": base[1], "chance": chance, "examples": len(examples)}

    meta = dict(meta or {})
    if task_meta:
        meta["task_base"] = task_meta
    meta.update(
        config=asdict(config),
        samples=int(sequences.shape[0]),
        seq_len=int(sequences.shape[1]),
        depth_samples=int(min(config.depth_samples, len(sequences))) if config.removal_loss else 0,
        shape=shape.as_dict(),
        seconds=round(time.perf_counter() - started, 2),
    )
    experts, expert_mlp, shared_mlp = {}, None, None
    if moe:  # [layers, ...] with zero rows for the dense layers
        experts = {m: torch.zeros(num_layers, shape.num_experts) for m in EXPERT_METRICS}
        expert_mlp = torch.zeros(num_layers, shape.num_experts, shape.moe_ffn_hidden_size)
        for i, stats in expert_stats.items():
            layer_scores, expert_mlp[i] = stats.result()
            for m, v in layer_scores.items():
                experts[m][i] = v.float()
        if shape.shared_expert_ffn_hidden_size:
            shared_mlp = torch.zeros(num_layers, shape.shared_expert_ffn_hidden_size)
            for i, acc in shared_acc.items():
                shared_mlp[i] = acc.result().float()
    return ImportanceScores(
        mlp=torch.stack([a.result() for a in mlp_acc]).float(),
        heads=torch.stack([a.result() for a in head_acc]).float(),
        hidden=torch.stack([a.result() for a in norm_acc]).sum(0).float(),
        block_influence={k: v.float() for k, v in influence.result().items()},
        removal_loss={k: v.float() for k, v in removal.items()},
        base_loss=base_loss,
        task_removal={t: {k: v.float() for k, v in table.items()} for t, table in task_removal.items()},
        experts=experts,
        expert_mlp=expert_mlp,
        shared_mlp=shared_mlp,
        meta=meta,
    )


def random_scores(
    config, seed: int = 0, block_sizes: tuple[int, ...] = (1,), tasks: tuple[str, ...] = ()
) -> ImportanceScores:
    """Uniformly random scores of the right shapes: the baseline that importance must beat."""
    shape = shape_of(config)
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *size: torch.rand(*size, generator=gen)  # noqa: E731
    layers = shape.num_layers
    return ImportanceScores(
        mlp=rand(layers, shape.ffn_hidden_size),
        heads=rand(layers, shape.num_attention_heads),
        hidden=rand(shape.hidden_size),
        block_influence={k: rand(layers - k + 1) for k in block_sizes},
        removal_loss={k: rand(layers - k + 1) for k in block_sizes},
        task_removal={t: {k: rand(layers - k + 1, 2) for k in block_sizes} for t in tasks},
        experts={m: rand(layers, shape.num_experts) for m in EXPERT_METRICS} if shape.num_experts else {},
        expert_mlp=rand(layers, shape.num_experts, shape.moe_ffn_hidden_size) if shape.num_experts else None,
        shared_mlp=rand(layers, shape.shared_expert_ffn_hidden_size) if shape.shared_expert_ffn_hidden_size else None,
        meta={"random": True, "seed": seed},
    )
