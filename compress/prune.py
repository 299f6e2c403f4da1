"""Structured pruning, uniform across layers: depth (layers), attention heads and KV groups (GQA-aware), MLP
neurons, and the hidden (embedding) size. The result is a plain model of the same class with a standard config
(head_dim written explicitly), so every runtime that loads the parent loads the student.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace

import torch

from compactlm.compress.arch import (
    ATTN_K,
    ATTN_O,
    ATTN_Q,
    ATTN_QKV,
    ATTN_V,
    MLP_DOWN,
    MLP_GATE,
    MLP_GATE_UP,
    MLP_UP,
    Family,
    ModelShape,
    count_params,
    family_of,
    shape_of,
    validate_config,
)
from compactlm.compress.depth import choose_layers_to_drop, depth_task
from compactlm.compress.importance import ImportanceScores
from compactlm.core.errors import CompactLMError


@dataclass(frozen=True)
class PruneTarget:
    """The pruned sizes; a field left as None keeps the model's size."""

    hidden_size: int | None = None
    ffn_hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_query_groups: int | None = None
    """KV heads. Pruning groups drops whole groups with their query heads."""
    num_layers: int | None = None
    """Keep this many layers, choosing which to drop by `depth_metric`."""
    drop_layers: tuple[int, ...] | None = None
    """Drop exactly these layer indices (instead of `num_layers`); a file may write them as `16-29` or `3,5,10-12`."""
    depth_metric: str = "block-loss"
    """block-loss | layer-loss | block-influence | task:NAME (see compactlm.compress.depth.choose_layers_to_drop)."""

    @classmethod
    def config_prepare(cls, data: dict) -> dict:
        if isinstance(data.get("drop_layers"), (str, int)) and not isinstance(data["drop_layers"], bool):
            try:
                data["drop_layers"] = list(parse_layer_ranges(str(data["drop_layers"])))
            except CompactLMError as exc:
                raise CompactLMError(str(exc), key="drop_layers") from exc
        return data

    def __post_init__(self):
        for name in (
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "num_layers",
        ):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise CompactLMError(f"--{name.replace('_', '-')} must be a positive integer, not {value!r}", key=name)
        if self.num_layers is not None and self.drop_layers is not None:
            raise CompactLMError("give either --num-layers or --drop-layers, not both", key="drop_layers")
        if self.drop_layers is not None:
            object.__setattr__(self, "drop_layers", tuple(sorted(set(int(i) for i in self.drop_layers))))
        try:
            depth_task(self.depth_metric)
        except CompactLMError as exc:
            raise CompactLMError(f"--depth-metric: {exc}", key="depth_metric") from exc


def parse_layer_ranges(text: str) -> tuple[int, ...]:
    """'16-29' or '3,5,10-12' -> layer indices."""
    indices: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                indices += range(lo, hi + 1)
            elif part:
                indices.append(int(part))
    except ValueError as exc:
        raise CompactLMError(
            f"cannot read layer list {text!r}: use indices and ranges like 16-29 or 3,5,10-12"
        ) from exc
    return tuple(indices)


def plan(config, target: PruneTarget) -> tuple[ModelShape, dict]:
    """Check a target against the model and the config class it loads with; return the new shape and config.

    Cheap (no weights): run it before any heavy work so that impossible targets fail first.
    """
    family_of(config)
    old = shape_of(config)
    hidden = target.hidden_size or old.hidden_size
    ffn = target.ffn_hidden_size or old.ffn_hidden_size
    per_group = old.num_attention_heads // old.num_query_groups
    groups = target.num_query_groups or old.num_query_groups
    if target.num_attention_heads is not None:
        heads = target.num_attention_heads
    elif target.num_query_groups is not None:
        heads = groups * per_group  # dropping whole groups takes their query heads along
    else:
        heads = old.num_attention_heads

    too_big = [
        f"{name} {new} > {orig}"
        for name, new, orig in [
            ("hidden_size", hidden, old.hidden_size),
            ("ffn_hidden_size", ffn, old.ffn_hidden_size),
            ("num_attention_heads", heads, old.num_attention_heads),
            ("num_query_groups", groups, old.num_query_groups),
            ("num_layers", target.num_layers or 0, old.num_layers),
        ]
        if new > orig
    ]
    if too_big:
        raise CompactLMError(f"pruning targets must not exceed the model's sizes: {', '.join(too_big)}")
    if heads % groups:
        raise CompactLMError(
            f"num_attention_heads ({heads}) must be a multiple of num_query_groups ({groups}): grouped-query "
            f"attention shares each KV group among the same number of query heads"
        )
    if heads // groups > per_group:
        raise CompactLMError(
            f"{heads} heads in {groups} groups would need {heads // groups} heads per group, but the model has "
            f"{per_group}: keep more groups (--num-query-groups) or fewer heads"
        )
    if target.drop_layers is not None:
        bad = [i for i in target.drop_layers if not 0 <= i < old.num_layers]
        if bad:
            raise CompactLMError(f"--drop-layers {bad} out of range: the model has layers 0-{old.num_layers - 1}")
        layers = old.num_layers - len(target.drop_layers)
    else:
        layers = target.num_layers or old.num_layers
    if layers < 1:
        raise CompactLMError("pruning would remove every layer")

    new_config = config.to_dict()
    new_config.update(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_attention_heads=heads,
        num_key_value_heads=groups,
        head_dim=old.head_dim,  # always kept, and written explicitly
        num_hidden_layers=layers,
    )
    for key in ("transformers_version", "_name_or_path"):
        new_config.pop(key, None)
    if getattr(config, "layer_types", None):
        new_config["layer_types"] = list(config.layer_types[:layers])  # the kept layers' own types: see prune()
    validate_config(new_config, type(config))
    new_shape = replace(
        old,
        num_layers=layers,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_attention_heads=heads,
        num_query_groups=groups,
    )
    return new_shape, new_config


def needs_scores(config, target: PruneTarget) -> bool:
    """False when nothing is chosen by importance: widths unchanged and layers named by --drop-layers (or kept)."""
    old, (new, _) = shape_of(config), plan(config, target)
    width_same = (old.hidden_size, old.ffn_hidden_size, old.num_attention_heads, old.num_query_groups) == (
        new.hidden_size,
        new.ffn_hidden_size,
        new.num_attention_heads,
        new.num_query_groups,
    )
    return not (width_same and (target.drop_layers is not None or new.num_layers == old.num_layers))


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in ascending index order (keeping all of them is the identity)."""
    if k == scores.numel():
        return torch.arange(k)
    return torch.sort(torch.topk(scores.float(), k, sorted=False).indices).values


@dataclass
class KeptIndices:
    """What survived, in the parent's indexing."""

    layers: torch.Tensor
    hidden: torch.Tensor
    groups: torch.Tensor
    """[kept layers, groups]"""
    heads: torch.Tensor
    """[kept layers, heads]"""
    mlp: torch.Tensor
    """[kept layers, ffn]"""

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.contiguous() for k, v in asdict(self).items()}


def select(scores: ImportanceScores, config, new: ModelShape, target: PruneTarget) -> KeptIndices:
    """Choose the units to keep from importance scores."""
    old = shape_of(config)
    if target.drop_layers is not None:
        dropped = list(target.drop_layers)
    else:
        dropped = choose_layers_to_drop(scores, old.num_layers - new.num_layers, target.depth_metric)
    layers = torch.tensor([i for i in range(old.num_layers) if i not in set(dropped)], dtype=torch.long)
    per_group_old = old.num_attention_heads // old.num_query_groups
    per_group_new = new.num_attention_heads // new.num_query_groups
    group_scores = scores.groups(old.num_query_groups)
    groups, heads, mlp = [], [], []
    for layer in layers.tolist():
        kept_groups = _top(group_scores[layer], new.num_query_groups)
        kept_heads = [
            g * per_group_old + _top(scores.heads[layer, g * per_group_old : (g + 1) * per_group_old], per_group_new)
            for g in kept_groups.tolist()
        ]
        groups.append(kept_groups)
        heads.append(torch.cat(kept_heads))
        mlp.append(_top(scores.mlp[layer], new.ffn_hidden_size))
    return KeptIndices(
        layers=layers,
        hidden=_top(scores.hidden, new.hidden_size),
        groups=torch.stack(groups),
        heads=torch.stack(heads),
        mlp=torch.stack(mlp),
    )


def _rows(head_indices: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (head_indices[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def _layer_rules(family: Family, old: ModelShape, hid: torch.Tensor) -> dict:
    """Parameter name (relative to `model.layers.{i}.`) -> how to slice it, given the layer's kept query rows `q`,
    KV rows `kv` and MLP neurons `m`."""
    q_rows, kv_rows = old.num_attention_heads * old.head_dim, old.num_query_groups * old.head_dim
    f = old.ffn_hidden_size
    rules = {
        f"{ATTN_O}.weight": lambda w, q, kv, m: w[hid][:, q],
        f"{ATTN_O}.bias": lambda w, q, kv, m: w[hid],
        f"{MLP_DOWN}.weight": lambda w, q, kv, m: w[hid][:, m],
        f"{MLP_DOWN}.bias": lambda w, q, kv, m: w[hid],
    } | {f"{norm}.weight": (lambda w, q, kv, m: w[hid]) for norm in family.norms}
    if family.fused:  # [q; k; v] and [gate; up] rows in one matrix each
        rules |= {
            f"{ATTN_QKV}.weight": lambda w, q, kv, m: w[torch.cat([q, q_rows + kv, q_rows + kv_rows + kv])][:, hid],
            f"{MLP_GATE_UP}.weight": lambda w, q, kv, m: w[torch.cat([m, f + m])][:, hid],
        }
    else:
        rules |= {
            f"{ATTN_Q}.weight": lambda w, q, kv, m: w[q][:, hid],
            f"{ATTN_Q}.bias": lambda w, q, kv, m: w[q],
            f"{ATTN_K}.weight": lambda w, q, kv, m: w[kv][:, hid],
            f"{ATTN_K}.bias": lambda w, q, kv, m: w[kv],
            f"{ATTN_V}.weight": lambda w, q, kv, m: w[kv][:, hid],
            f"{ATTN_V}.bias": lambda w, q, kv, m: w[kv],
            f"{MLP_GATE}.weight": lambda w, q, kv, m: w[m][:, hid],
            f"{MLP_GATE}.bias": lambda w, q, kv, m: w[m],
            f"{MLP_UP}.weight": lambda w, q, kv, m: w[m][:, hid],
            f"{MLP_UP}.bias": lambda w, q, kv, m: w[m],
        }
    if family.qk_norm == "head":  # per head_dim: head_dim is kept
        rules |= {"self_attn.q_norm.weight": lambda w, q, kv, m: w, "self_attn.k_norm.weight": lambda w, q, kv, m: w}
    elif family.qk_norm == "full":  # over all heads' rows: the kept heads' entries
        rules |= {
            "self_attn.q_norm.weight": lambda w, q, kv, m: w[q],
            "self_attn.k_norm.weight": lambda w, q, kv, m: w[kv],
        }
    return rules


def slice_state_dict(
    state: dict[str, torch.Tensor], kept: KeptIndices, family: Family, old: ModelShape
) -> dict[str, torch.Tensor]:
    """The parent's weights restricted to the kept units, renumbered to the kept layers.

    Gemma scales its embeddings by sqrt(hidden_size): a hidden cut from d to d' scales the kept embedding columns
    by sqrt(d / d'), so that what enters the residual stream is unchanged; with tied embeddings the LM head reads
    the same matrix, so the final norm's scale takes the inverse factor and the logits of a given final hidden state
    are unchanged too.
    """
    hid = kept.hidden
    head_dim = old.head_dim
    layer_rules = _layer_rules(family, old, hid)
    embed_factor = math.sqrt(old.hidden_size / len(hid)) if family.embed_scale else 1.0
    new_index = {old: new for new, old in enumerate(kept.layers.tolist())}
    out: dict[str, torch.Tensor] = {}
    for name, weight in state.items():
        if name.startswith("model.layers."):
            old_layer, rest = name[len("model.layers.") :].split(".", 1)
            if int(old_layer) not in new_index:
                continue
            j = new_index[int(old_layer)]
            if rest not in layer_rules:
                raise CompactLMError(f"do not know how to prune parameter {name!r} (an unsupported model variant)")
            q = _rows(kept.heads[j], head_dim)
            kv = _rows(kept.groups[j], head_dim)
            out[f"model.layers.{j}.{rest}"] = layer_rules[rest](weight, q, kv, kept.mlp[j]).contiguous()
        elif name == "model.embed_tokens.weight":
            out[name] = (weight[:, hid] * embed_factor).contiguous()
        elif name == "lm_head.weight":  # tied: the embedding matrix itself, scaled alike
            out[name] = (weight[:, hid] * (embed_factor if old.tied_embeddings else 1.0)).contiguous()
        elif name == "model.norm.weight":
            out[name] = weight[hid].contiguous()
            if embed_factor != 1.0 and old.tied_embeddings:
                offset = family.norm_offset
                out[name] = ((out[name].float() + offset) / embed_factor - offset).to(weight.dtype)
        else:
            raise CompactLMError(f"do not know how to prune parameter {name!r} (an unsupported model variant)")
    return out


def prune(model, scores: ImportanceScores, target: PruneTarget):
    """Return `(student, record, kept)`: a new model of the same class, pruned to `target` by `scores`.

    `record` describes what was done (target, shapes, parameters) for `compactlm.json`; `kept` holds the
    surviving indices in the parent's numbering.
    """
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    config = model.config
    scores.check_matches(config)
    new_shape, new_config = plan(config, target)
    kept = select(scores, config, new_shape, target)
    if getattr(config, "layer_types", None):
        new_config["layer_types"] = [config.layer_types[i] for i in kept.layers.tolist()]
    state = slice_state_dict(model.state_dict(), kept, family_of(config), shape_of(config))
    student_config = type(config)(**new_config)
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every weight is loaded just below: a random init would cost seconds for nothing
        student = AutoModelForCausalLM.from_config(student_config, dtype=next(model.parameters()).dtype)
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if new_shape.tied_embeddings else set()
    if unexpected or set(missing) - tied:
        raise CompactLMError(f"pruned weights do not fit the pruned model: missing {missing}, unexpected {unexpected}")
    if new_shape.tied_embeddings:
        student.tie_weights()
    student.eval()
    old_shape = shape_of(config)
    record = {
        "op": "prune",
        "target": {k: v for k, v in asdict(target).items() if v is not None},
        "from_shape": old_shape.as_dict(),
        "to_shape": new_shape.as_dict(),
        "params_before": count_params(old_shape),
        "params_after": count_params(new_shape),
        "dropped_layers": [i for i in range(old_shape.num_layers) if i not in set(kept.layers.tolist())],
        "importance": scores.meta,
        "seconds": round(time.perf_counter() - started, 2),
    }
    return student, record, kept
