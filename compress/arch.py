"""One adapter over the Llama-shaped decoder families (Llama incl. SmolLM2, Mistral, Qwen2, Qwen3, Granite, OLMo 2,
Phi-3, Gemma 2, Gemma 3 text): what differs between them is data in a `Family`, not code paths.

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
}


def family_of(config) -> Family:
    """The family adapter for a config, or a clear error naming what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise CompactLMError(
            f"unsupported architecture {model_type!r}: compactlm prunes decoder-only models of the "
            f"families {', '.join(FAMILIES)} (Llama-shaped blocks: q/k/v/o projections, gated MLP, RMSNorm)"
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

    def as_dict(self) -> dict:
        return asdict(self)


def recorded_shape(record: dict) -> ModelShape:
    """A shape as a record wrote it: fields added since then take their defaults, fields unknown here are ignored."""
    known = {f.name for f in fields(ModelShape)}
    return ModelShape(**{k: v for k, v in record.items() if k in known})


def head_dim_of(config) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


def shape_of(config) -> ModelShape:
    family = family_of(config)
    return ModelShape(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.intermediate_size,
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
    )


def count_params(shape: ModelShape) -> int:
    """Parameter count of a model of this shape, without building it (matches `sum(p.numel())`)."""
    d, f, hd = shape.hidden_size, shape.ffn_hidden_size, shape.head_dim
    q, kv = shape.num_attention_heads * hd, shape.num_query_groups * hd
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * f + shape.norms_per_layer * d
    if shape.qkv_bias:
        per_layer += q + 2 * kv
    if shape.o_bias:
        per_layer += d
    if shape.mlp_bias:
        per_layer += 2 * f + d
    if shape.qk_norm:
        per_layer += q + kv if shape.qk_norm_full else 2 * hd
    embeddings = shape.vocab_size * d * (1 if shape.tied_embeddings else 2)
    return embeddings + shape.num_layers * per_layer + d


def decoder_layers(model):
    """The ModuleList of decoder blocks of a *ForCausalLM model."""
    return model.model.layers


# State-dict names, relative to `model.layers.{i}.`
ATTN_Q, ATTN_K, ATTN_V, ATTN_O = (f"self_attn.{p}_proj" for p in "qkvo")
MLP_GATE, MLP_UP, MLP_DOWN = "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"
ATTN_QKV, MLP_GATE_UP = "self_attn.qkv_proj", "mlp.gate_up_proj"  # Phi-3's fused projections


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
