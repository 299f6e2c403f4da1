"""One adapter over the Llama-shaped decoder families (Llama incl. SmolLM2, Mistral, Qwen2, Qwen3, Granite, OLMo 2,
Phi-3, Gemma 2, Gemma 3 text) and the mixtures of experts built on the same block (Mixtral, Qwen2-MoE, Qwen3-MoE):
what differs between them is data in a `Family`, not code paths.

It names the parameters that pruning slices, describes a model's shape, counts parameters analytically, and
validates a proposed config against the config class the checkpoint will be loaded with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from compactlm.core.errors import CompactLMError

LLAMA_NORMS = ("input_layernorm", "post_attention_layernorm")


@dataclass(frozen=True)
class Family:
    """What differs between the supported decoder families.

    Each bias is True (always there), False (never), or the name of the config flag that switches it on.
    """

    model_type: str
    qkv_bias: bool | str
    o_bias: bool | str
    mlp_bias: bool | str
    qk_norm: str | None = None
    """"head": q and k normalized per head (a [head_dim] norm: Qwen3, Gemma 3), untouched by pruning since head_dim
    is kept; "full": one norm over all heads' projections (OLMo 2: [heads * head_dim]), sliced with the heads."""
    norms: tuple[str, ...] = LLAMA_NORMS
    """The [hidden] norms of a decoder layer (Gemma: pre/post-attention and pre/post-feedforward; OLMo 2: the two
    post-norms only). Pruning slices each by the kept channels; importance reads each one's output."""
    fused: bool = False
    """Phi-3: one `qkv_proj` ([q; k; v] rows) and one `gate_up_proj` ([gate; up] rows) per layer."""
    embed_scale: bool = False
    """Gemma: the embeddings enter the residual stream times sqrt(hidden_size), so a hidden cut rescales them."""
    norm_offset: float = 0.0
    """Gemma's RMSNorm multiplies by (1 + weight), the others by weight."""
    experts_key: str | None = None
    """Mixture of experts: the config key of the number of routed experts (None: a dense model)."""
    expert_ffn_key: str | None = None
    """The config key of each expert's FFN width (Mixtral's is `intermediate_size`: it has no dense MLP at all)."""
    shared_expert: bool = False
    """Qwen2-MoE: one always-on expert per MoE layer (`mlp.shared_expert`, an MLP) behind a sigmoid gate."""

    def has(self, bias: str, config) -> bool:
        value = getattr(self, bias)
        return value if isinstance(value, bool) else bool(getattr(config, value, False))


GEMMA_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "attention_bias", "attention_bias", "mlp_bias"),
    "mistral": Family("mistral", False, False, False),
    "qwen2": Family("qwen2", True, False, False),
    "qwen3": Family("qwen3", "attention_bias", "attention_bias", False, qk_norm="head"),
    "granite": Family("granite", "attention_bias", "attention_bias", "mlp_bias"),  # + multipliers pruning keeps
    "olmo2": Family(
        "olmo2",
        "attention_bias",
        "attention_bias",
        False,
        qk_norm="full",
        norms=("post_attention_layernorm", "post_feedforward_layernorm"),
    ),
    "phi3": Family("phi3", False, False, False, fused=True),
    "gemma2": Family(
        "gemma2", "attention_bias", "attention_bias", False, norms=GEMMA_NORMS, embed_scale=True, norm_offset=1.0
    ),
    "gemma3_text": Family(
        "gemma3_text",
        "attention_bias",
        "attention_bias",
        False,
        qk_norm="head",
        norms=GEMMA_NORMS,
        embed_scale=True,
        norm_offset=1.0,
    ),
    "mixtral": Family(
        "mixtral", False, False, False, experts_key="num_local_experts", expert_ffn_key="intermediate_size"
    ),
    "qwen2_moe": Family(
        "qwen2_moe",
        "qkv_bias",
        False,
        False,
        experts_key="num_experts",
        expert_ffn_key="moe_intermediate_size",
        shared_expert=True,
    ),
    "qwen3_moe": Family(
        "qwen3_moe",
        "attention_bias",
        "attention_bias",
        False,
        qk_norm="head",
        experts_key="num_experts",
        expert_ffn_key="moe_intermediate_size",
    ),
}


def family_of(config) -> Family:
    """The family adapter for a config, or a clear error naming what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise CompactLMError(
            f"unsupported architecture {model_type!r}: compactlm prunes decoder-only models of the "
            f"families {', '.join(FAMILIES)} (Llama-shaped blocks: q/k/v/o projections, gated MLP or routed "
            f"experts, RMSNorm)"
        )
    return FAMILIES[model_type]


@dataclass(frozen=True)
class ModelShape:
    """The sizes that pruning changes, plus what the parameter count depends on."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    qk_norm_full: bool = False
    """OLMo 2's q/k norms span all heads ([heads * head_dim], [groups * head_dim]) instead of one head."""
    norms_per_layer: int = 2
    num_experts: int = 0
    """Routed experts per MoE layer (0: a dense model)."""
    experts_per_token: int = 0
    """The router's top-k."""
    moe_ffn_hidden_size: int = 0
    """Each routed expert's FFN width (uniform across experts)."""
    shared_expert_ffn_hidden_size: int = 0
    """The shared expert's FFN width (Qwen2-MoE), 0 where there is none."""
    moe_layers: int = 0
    """How many layers route to experts; the other `num_layers - moe_layers` have a dense MLP of `ffn_hidden_size`."""

    def as_dict(self) -> dict:
        return asdict(self)


def recorded_shape(record: dict) -> ModelShape:
    """A shape as a record wrote it: fields added since then take their defaults, fields unknown here are ignored."""
    known = {f.name for f in fields(ModelShape)}
    return ModelShape(**{k: v for k, v in record.items() if k in known})


def head_dim_of(config) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


def moe_layer_indices(config) -> tuple[int, ...]:
    """The layers that route to experts, by the rule the MoE config classes use (every `decoder_sparse_step`-th layer
    not in `mlp_only_layers`; all of them for Mixtral)."""
    family = family_of(config)
    if family.experts_key is None or not getattr(config, family.experts_key, 0):
        return ()
    step = getattr(config, "decoder_sparse_step", 1) or 1
    dense = set(getattr(config, "mlp_only_layers", None) or ())
    return tuple(i for i in range(config.num_hidden_layers) if i not in dense and (i + 1) % step == 0)


def shape_of(config) -> ModelShape:
    family = family_of(config)
    moe = family.experts_key is not None
    mixtral_like = family.expert_ffn_key == "intermediate_size"  # its intermediate_size is the experts' width
    return ModelShape(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        ffn_hidden_size=0 if mixtral_like else config.intermediate_size,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim_of(config),
        vocab_size=config.vocab_size,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=family.has("qkv_bias", config),
        o_bias=family.has("o_bias", config),
        mlp_bias=family.has("mlp_bias", config),
        qk_norm=family.qk_norm is not None,
        qk_norm_full=family.qk_norm == "full",
        norms_per_layer=len(family.norms),
        num_experts=int(getattr(config, family.experts_key)) if moe else 0,
        experts_per_token=int(config.num_experts_per_tok) if moe else 0,
        moe_ffn_hidden_size=int(getattr(config, family.expert_ffn_key)) if moe else 0,
        shared_expert_ffn_hidden_size=int(config.shared_expert_intermediate_size) if family.shared_expert else 0,
        moe_layers=len(moe_layer_indices(config)),
    )


def count_params(shape: ModelShape) -> int:
    """Parameter count of a model of this shape, without building it (matches `sum(p.numel())`)."""
    d, f, hd = shape.hidden_size, shape.ffn_hidden_size, shape.head_dim
    q, kv = shape.num_attention_heads * hd, shape.num_query_groups * hd
    per_layer = d * q + 2 * d * kv + q * d + shape.norms_per_layer * d
    if shape.qkv_bias:
        per_layer += q + 2 * kv
    if shape.o_bias:
        per_layer += d
    if shape.qk_norm:
        per_layer += q + kv if shape.qk_norm_full else 2 * hd
    dense_mlp = 3 * d * f + (2 * f + d if shape.mlp_bias else 0)
    moe_mlp = shape.num_experts * (3 * d * shape.moe_ffn_hidden_size + d)  # each expert's FFN and its router row
    if shape.shared_expert_ffn_hidden_size:
        moe_mlp += 3 * d * shape.shared_expert_ffn_hidden_size + d  # the shared expert and its [1, d] gate
    mlps = (shape.num_layers - shape.moe_layers) * dense_mlp + shape.moe_layers * moe_mlp
    embeddings = shape.vocab_size * d * (1 if shape.tied_embeddings else 2)
    return embeddings + shape.num_layers * per_layer + mlps + d


def decoder_layers(model):
    """The ModuleList of decoder blocks of a *ForCausalLM model."""
    return model.model.layers


def submodule(layer, dotted: str):
    """The module at a dotted name (one of the names below) inside a decoder layer."""
    for part in dotted.split("."):
        layer = getattr(layer, part)
    return layer


# State-dict names, relative to `model.layers.{i}.`
ATTN_Q, ATTN_K, ATTN_V, ATTN_O = (f"self_attn.{p}_proj" for p in "qkvo")
MLP_GATE, MLP_UP, MLP_DOWN = "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"
ATTN_QKV, MLP_GATE_UP = "self_attn.qkv_proj", "mlp.gate_up_proj"  # Phi-3's fused projections
# Mixture of experts, as transformers holds them in memory (its checkpoints on disk keep one tensor per expert; it
# converts on load and back on save): the router's [experts, hidden] weight, each expert's [gate; up] rows stacked
# [experts, 2 * ffn, hidden] and down projection [experts, hidden, ffn]; Qwen2-MoE's shared expert and its gate.
MOE_ROUTER, MOE_EXPERTS = "mlp.gate", "mlp.experts"
MOE_GATE_UP, MOE_DOWN = f"{MOE_EXPERTS}.gate_up_proj", f"{MOE_EXPERTS}.down_proj"
SHARED, SHARED_GATE = "mlp.shared_expert", "mlp.shared_expert_gate"


def validate_config(config_dict: dict, config_class) -> None:
    """Build the config class the checkpoint will load with, and turn its refusal into a clear error."""
    try:
        config = config_class(**config_dict)
        validate = getattr(config, "validate_architecture", None)
        if callable(validate):
            validate()
    except Exception as exc:  # transformers raises its strict-dataclass validation error, a ValueError inside
        reason = str(exc).strip().splitlines()[-1].strip().removeprefix("ValueError: ").rstrip(".")
        hint = ""
        if "multiple of the number of attention heads" in reason:
            heads = config_dict["num_attention_heads"]
            hint = (
                f"; it checks this even though head_dim is set explicitly, so choose a hidden size that is a "
                f"multiple of {heads} (or prune heads too)"
            )
        raise CompactLMError(
            f"{config_class.__name__} (which this checkpoint loads with) refuses the pruned shape: {reason}{hint}"
        ) from exc
