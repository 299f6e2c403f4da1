"""Structured pruning, uniform across layers: depth (layers), attention heads and KV groups (GQA-aware), MLP
neurons, the hidden (embedding) size, and in a mixture of experts the number of routed experts, each expert's FFN
neurons and the shared expert's. The result is a plain model of the same class with a standard config
(head_dim written explicitly), so every runtime that loads the parent loads the student.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

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
    MOE_DOWN,
    MOE_GATE_UP,
    MOE_ROUTER,
    SHARED,
    SHARED_GATE,
    Family,
    ModelShape,
    count_params,
    family_of,
    moe_layer_indices,
    shape_of,
    validate_config,
)
from compactlm.compress.depth import choose_layers_to_drop, depth_task
from compactlm.compress.experts import EXPERT_METRICS
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
    num_experts: int | None = None
    """Mixture of experts: keep this many routed experts in every MoE layer (each layer its most important)."""
    moe_ffn_hidden_size: int | None = None
    """Each routed expert's FFN width (uniform across experts; each expert keeps its own most important neurons)."""
    shared_expert_ffn_hidden_size: int | None = None
    """The shared expert's FFN width (Qwen2-MoE), pruned like a dense MLP."""
    expert_metric: str = "contribution"
    """How experts are ranked: one of compactlm.compress.experts.EXPERT_METRICS."""

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
            "num_experts",
            "moe_ffn_hidden_size",
            "shared_expert_ffn_hidden_size",
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
        if self.expert_metric not in EXPERT_METRICS:
            raise CompactLMError(
                f"--expert-metric must be one of {', '.join(EXPERT_METRICS)}, not {self.expert_metric!r}",
                key="expert_metric",
            )


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
    family = family_of(config)
    old = shape_of(config)
    _check_moe_target(config, family, old, target)
    hidden = target.hidden_size or old.hidden_size
    ffn = target.ffn_hidden_size or old.ffn_hidden_size
    experts = target.num_experts or old.num_experts
    expert_ffn = target.moe_ffn_hidden_size or old.moe_ffn_hidden_size
    shared_ffn = target.shared_expert_ffn_hidden_size or old.shared_expert_ffn_hidden_size
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
            ("num_experts", experts, old.num_experts),
            ("moe_ffn_hidden_size", expert_ffn, old.moe_ffn_hidden_size),
            ("shared_expert_ffn_hidden_size", shared_ffn, old.shared_expert_ffn_hidden_size),
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
        num_attention_heads=heads,
        num_key_value_heads=groups,
        head_dim=old.head_dim,  # always kept, and written explicitly
        num_hidden_layers=layers,
    )
    if family.expert_ffn_key != "intermediate_size":  # Mixtral's intermediate_size is its experts' width
        new_config["intermediate_size"] = ffn
    if old.num_experts:  # under the key the config class stores (Qwen3-MoE maps num_experts to num_local_experts)
        aliases = getattr(config, "attribute_map", {}) or {}
        new_config[aliases.get(family.experts_key, family.experts_key)] = experts
        new_config[aliases.get(family.expert_ffn_key, family.expert_ffn_key)] = expert_ffn
    if old.shared_expert_ffn_hidden_size:
        new_config["shared_expert_intermediate_size"] = shared_ffn
    for key in ("transformers_version", "_name_or_path"):
        new_config.pop(key, None)
    kept_layers = list(range(layers))  # until importance chooses them (see prune())
    new_config |= layer_metadata(config, kept_layers)
    validate_config(new_config, type(config))
    new_shape = shape_of(type(config)(**new_config))
    return new_shape, new_config


def layer_metadata(config, kept_layers: list[int]) -> dict:
    """The per-layer config entries of a model keeping `kept_layers` (in the parent's numbering), renumbered: the
    kept layers' own sliding/full `layer_types`, and which of them route to experts (a depth cut can break the
    every-`decoder_sparse_step`-th rule, so it is written as `mlp_only_layers` with step 1)."""
    out: dict = {}
    if getattr(config, "layer_types", None):
        out["layer_types"] = [config.layer_types[i] for i in kept_layers]
    if hasattr(config, "mlp_only_layers"):
        moe = set(moe_layer_indices(config))
        out["mlp_only_layers"] = [j for j, i in enumerate(kept_layers) if i not in moe]
        out["decoder_sparse_step"] = 1
    return out


def _check_moe_target(config, family: Family, old: ModelShape, target: PruneTarget) -> None:
    """Refuse expert targets on a dense model, a dense-MLP target where there is no dense MLP, and fewer experts
    than the router picks per token."""
    moe_fields = ("num_experts", "moe_ffn_hidden_size", "shared_expert_ffn_hidden_size")
    given = [f"--{f.replace('_', '-')}" for f in moe_fields if getattr(target, f) is not None]
    if given and not old.num_experts:
        raise CompactLMError(f"{', '.join(given)}: {config.model_type} is not a mixture-of-experts model")
    if target.shared_expert_ffn_hidden_size is not None and not old.shared_expert_ffn_hidden_size:
        raise CompactLMError(f"--shared-expert-ffn-hidden-size: {config.model_type} has no shared expert")
    if target.ffn_hidden_size is not None and old.num_experts and old.moe_layers == old.num_layers:
        raise CompactLMError(
            f"--ffn-hidden-size: every layer of this {config.model_type} model routes to experts (no dense MLP); "
            f"prune the experts' width with --moe-ffn-hidden-size"
        )
    if target.num_experts is not None and target.num_experts < old.experts_per_token:
        raise CompactLMError(
            f"--num-experts {target.num_experts} is fewer than the {old.experts_per_token} experts the router picks "
            f"for each token (num_experts_per_tok): keep at least {old.experts_per_token}"
        )


def needs_scores(config, target: PruneTarget) -> bool:
    """False when nothing is chosen by importance: widths unchanged and layers named by --drop-layers (or kept)."""
    old, (new, _) = shape_of(config), plan(config, target)
    widths = (
        "hidden_size",
        "ffn_hidden_size",
        "num_attention_heads",
        "num_query_groups",
        "num_experts",
        "moe_ffn_hidden_size",
        "shared_expert_ffn_hidden_size",
    )
    width_same = all(getattr(old, w) == getattr(new, w) for w in widths)
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
    """[kept layers, ffn]: the dense MLP's neurons (rows of MoE layers are unused)."""
    experts: torch.Tensor | None = None
    """[kept layers, experts]: the routed experts kept (rows of dense layers are unused)."""
    expert_mlp: torch.Tensor | None = None
    """[kept layers, experts, expert ffn]: each kept expert's neurons, in the order of `experts`."""
    shared_mlp: torch.Tensor | None = None
    """[kept layers, shared ffn]: the shared expert's neurons."""

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.contiguous() for k, v in asdict(self).items() if v is not None}


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
    kept = KeptIndices(
        layers=layers,
        hidden=_top(scores.hidden, new.hidden_size),
        groups=torch.stack(groups),
        heads=torch.stack(heads),
        mlp=torch.stack(mlp),
    )
    if old.num_experts:
        experts = [_top(scores.experts[target.expert_metric][i], new.num_experts) for i in layers.tolist()]
        kept.experts = torch.stack(experts)
        kept.expert_mlp = torch.stack(
            [
                torch.stack([_top(scores.expert_mlp[i, e], new.moe_ffn_hidden_size) for e in chosen.tolist()])
                for i, chosen in zip(layers.tolist(), experts, strict=True)
            ]
        )
    if old.shared_expert_ffn_hidden_size:
        kept.shared_mlp = torch.stack(
            [_top(scores.shared_mlp[i], new.shared_expert_ffn_hidden_size) for i in layers.tolist()]
        )
    return kept


def _rows(head_indices: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (head_indices[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


@dataclass(frozen=True)
class _Kept:
    """One kept layer's units: query rows `q`, KV rows `kv`, MLP neurons `m`; its routed experts `e`, their neurons
    `em` ([experts, expert ffn]) and the shared expert's `sm` (None in a dense model)."""

    q: torch.Tensor
    kv: torch.Tensor
    m: torch.Tensor
    e: torch.Tensor | None = None
    em: torch.Tensor | None = None
    sm: torch.Tensor | None = None


def _experts_gate_up(w: torch.Tensor, k: _Kept, hid: torch.Tensor) -> torch.Tensor:
    """[experts, 2 * ffn, hidden] -> the kept experts, each its own kept [gate; up] rows, the kept columns."""
    f = w.shape[1] // 2
    return torch.stack([w[e][torch.cat([m, f + m])][:, hid] for e, m in zip(k.e.tolist(), k.em, strict=True)])


def _experts_down(w: torch.Tensor, k: _Kept, hid: torch.Tensor) -> torch.Tensor:
    """[experts, hidden, ffn] -> the kept experts, the kept hidden rows, each expert's kept neurons."""
    return torch.stack([w[e][hid][:, m] for e, m in zip(k.e.tolist(), k.em, strict=True)])


def _layer_rules(family: Family, old: ModelShape, hid: torch.Tensor) -> dict:
    """Parameter name (relative to `model.layers.{i}.`) -> how to slice it, given the layer's kept units (`_Kept`)."""
    q_rows, kv_rows = old.num_attention_heads * old.head_dim, old.num_query_groups * old.head_dim
    f = old.ffn_hidden_size
    rules = {
        f"{ATTN_O}.weight": lambda w, k: w[hid][:, k.q],
        f"{ATTN_O}.bias": lambda w, k: w[hid],
        f"{MLP_DOWN}.weight": lambda w, k: w[hid][:, k.m],
        f"{MLP_DOWN}.bias": lambda w, k: w[hid],
    } | {f"{norm}.weight": (lambda w, k: w[hid]) for norm in family.norms}
    if family.fused:  # [q; k; v] and [gate; up] rows in one matrix each
        rules |= {
            f"{ATTN_QKV}.weight": lambda w, k: w[torch.cat([k.q, q_rows + k.kv, q_rows + kv_rows + k.kv])][:, hid],
            f"{MLP_GATE_UP}.weight": lambda w, k: w[torch.cat([k.m, f + k.m])][:, hid],
        }
    else:
        rules |= {
            f"{ATTN_Q}.weight": lambda w, k: w[k.q][:, hid],
            f"{ATTN_Q}.bias": lambda w, k: w[k.q],
            f"{ATTN_K}.weight": lambda w, k: w[k.kv][:, hid],
            f"{ATTN_K}.bias": lambda w, k: w[k.kv],
            f"{ATTN_V}.weight": lambda w, k: w[k.kv][:, hid],
            f"{ATTN_V}.bias": lambda w, k: w[k.kv],
            f"{MLP_GATE}.weight": lambda w, k: w[k.m][:, hid],
            f"{MLP_GATE}.bias": lambda w, k: w[k.m],
            f"{MLP_UP}.weight": lambda w, k: w[k.m][:, hid],
            f"{MLP_UP}.bias": lambda w, k: w[k.m],
        }
    if family.qk_norm == "head":  # per head_dim: head_dim is kept
        rules |= {"self_attn.q_norm.weight": lambda w, k: w, "self_attn.k_norm.weight": lambda w, k: w}
    elif family.qk_norm == "full":  # over all heads' rows: the kept heads' entries
        rules |= {
            "self_attn.q_norm.weight": lambda w, k: w[k.q],
            "self_attn.k_norm.weight": lambda w, k: w[k.kv],
        }
    if family.experts_key:
        rules |= {
            f"{MOE_ROUTER}.weight": lambda w, k: w[k.e][:, hid],  # the router's rows of the kept experts
            MOE_GATE_UP: lambda w, k: _experts_gate_up(w, k, hid),
            MOE_DOWN: lambda w, k: _experts_down(w, k, hid),
        }
    if family.shared_expert:
        rules |= {
            f"{SHARED}.gate_proj.weight": lambda w, k: w[k.sm][:, hid],
            f"{SHARED}.up_proj.weight": lambda w, k: w[k.sm][:, hid],
            f"{SHARED}.down_proj.weight": lambda w, k: w[hid][:, k.sm],
            f"{SHARED_GATE}.weight": lambda w, k: w[:, hid],
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
            units = _Kept(
                q=_rows(kept.heads[j], head_dim),
                kv=_rows(kept.groups[j], head_dim),
                m=kept.mlp[j],
                e=None if kept.experts is None else kept.experts[j],
                em=None if kept.expert_mlp is None else kept.expert_mlp[j],
                sm=None if kept.shared_mlp is None else kept.shared_mlp[j],
            )
            out[f"model.layers.{j}.{rest}"] = layer_rules[rest](weight, units).contiguous()
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
    new_config |= layer_metadata(config, kept.layers.tolist())
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
    old_shape, new_shape = shape_of(config), shape_of(student_config)  # which layers route depends on the kept ones
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
