"""TensorRT-LLM checkpoints, the legacy `trtllm-engine` flow's input to trtllm-build: export a Hugging Face
model with nvidia-modelopt (FP16/BF16, or FP8 after post-training calibration), repair what modelopt writes wrong
under transformers 5, and read a checkpoint back
into Hugging Face names to check the round trip on CPU.

A TensorRT-LLM checkpoint is `config.json` plus one `rank{r}.safetensors` per tensor-parallel rank, with names
such as `transformer.layers.{i}.attention.qkv.weight`. How the ranks split a tensor (the reader merges them):

    attention.qkv, mlp.fc, mlp.gate, lm_head    column-parallel: rows split (qkv per rank is [q_r; k_r; v_r], and
                                                 a KV head is copied to tp/kv ranks when tp > kv heads)
    attention.dense, mlp.proj                   row-parallel: columns split, bias whole on every rank
    vocab_embedding                             split along `embedding_sharding_dim` (vocab padded to tp)
    norms, q/k_layernorm, scaling factors       whole on every rank

TensorRT-LLM's Llama MLP names differ from Hugging Face's: `mlp.fc` is gate_proj (the activated branch),
`mlp.gate` is up_proj, `mlp.proj` is down_proj. FP8 weights are float8_e4m3fn with a per-tensor
`weights_scaling_factor` (w = w8 * scale); `activation_scaling_factor` is the static scale of the layer's input.

All modelopt imports happen inside functions: importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from compactlm.core.errors import CompactLMError

if TYPE_CHECKING:
    import torch

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp8": "float16", "int8-sq": "float16", "int4-awq": "float16"}
"""Precision -> dtype of the checkpoint's unquantized tensors (quantized ones keep norms, embeddings, lm_head in
fp16). fp8, int8-sq and int4-awq are compactlm.compress.quantize's formats: calibrated here, or already by
`compress quantize`."""
QUANTIZED = ("fp8", "int8-sq", "int4-awq")

DECODER_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen", "qwen3": "qwen"}
"""Hugging Face model_type -> modelopt decoder_type (TensorRT-LLM runs Mistral as Llama, Qwen2/3 as QWen)."""

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
"""RoPE variants TensorRT-LLM's attention implements (its RotaryScalingType); "default" means no scaling."""

FP8_MAX = 448.0
SCALE_SUFFIXES = ("weights_scaling_factor", "activation_scaling_factor", "kv_cache_scaling_factor")


# -- export


def rope_settings(hf_config) -> tuple[float, dict | None]:
    """(rotary_base, rotary_scaling) for TensorRT-LLM from a transformers 4 or 5 config.

    transformers 5 moved rope_theta into `rope_parameters` (modelopt then writes no rotary_base, and TensorRT-LLM
    would fall back to its own default): read it from there. Scaling is passed the way TensorRT-LLM's own
    converter does (the HF dict), with "type" set, and None for plain RoPE.
    """
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    theta = params.pop("rope_theta", None) or getattr(hf_config, "rope_theta", None)
    if theta is None:
        raise CompactLMError("the model config has no rope_theta (neither in rope_parameters nor at top level)")
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        raise CompactLMError(
            f"RoPE type {rope_type!r} is not supported by the trtllm backend; supported: {', '.join(ROPE_TYPES)}"
        )
    if rope_type == "default":
        return float(theta), None
    scaling = {k: v for k, v in params.items() if k != "rope_type"}
    scaling["type"] = rope_type
    return float(theta), scaling


def config_fields(hf_config) -> dict:
    """The config.json fields TensorRT-LLM needs that modelopt's export (without tensorrt_llm importable) leaves
    out or gets wrong under transformers 5."""
    from compactlm.compress.arch import family_of, shape_of

    family = family_of(hf_config)
    shape = shape_of(hf_config)
    rotary_base, rotary_scaling = rope_settings(hf_config)
    fields: dict = {"rotary_base": rotary_base, "rotary_scaling": rotary_scaling}
    if DECODER_TYPES[family.model_type] == "qwen":
        # QWenConfig defaults to Qwen v1 (merged c_attn, halved MLP) without qwen_type; attn_bias is q/k/v only.
        fields |= {
            "qwen_type": family.model_type,
            "attn_bias": shape.qkv_bias,
            "mlp_bias": False,
            "use_logn_attn": False,
            "seq_length": int(hf_config.max_position_embeddings),
        }
    else:
        fields |= {"attn_bias": shape.qkv_bias, "mlp_bias": shape.mlp_bias}
    return fields


def quantize_fp8(model, calibration: Iterable[torch.Tensor]) -> int:
    """FP8 post-training quantization in place (modelopt's FP8_DEFAULT_CFG: per-tensor weight and static input
    scales, max calibration). `calibration`: token tensors ([T] or [B, T]). Returns the tokens seen."""
    from compactlm.compress.quantize import quantize_model

    return quantize_model(model, "fp8", calibration)["calibration_tokens"]


def export_checkpoint(
    model,
    out: Path,
    *,
    precision: str = "fp16",
    tp_size: int = 1,
    calibration: Iterable[torch.Tensor] | None = None,
    verify_tokens: torch.Tensor | None = None,
) -> dict:
    """Write `model` (a HF Llama-family causal LM in fp32) as a TensorRT-LLM checkpoint in `out`.

    fp8, int8-sq and int4-awq quantize `model` in place first, calibrated on `calibration` (token tensors), unless it
    is quantized already (a checkpoint from `compress quantize`, loaded with its quantizers). With `verify_tokens`
    ([B, T] ids) the checkpoint is read back, dequantized, loaded into a fresh HF model and its logits compared
    with the source's: the result goes under "verification". Returns what the manifest records.
    """
    import torch

    if precision not in DTYPES:
        raise CompactLMError(f"unknown TensorRT-LLM precision {precision!r}; choose from {', '.join(DTYPES)}")
    from compactlm.compress.arch import family_of

    family = family_of(model.config)
    decoder_type = DECODER_TYPES[family.model_type]
    info: dict = {"decoder_type": decoder_type, "dtype": DTYPES[precision]}

    source_logits = None
    if verify_tokens is not None:
        with torch.inference_mode():
            source_logits = model(input_ids=verify_tokens, use_cache=False).logits.float()

    if precision in QUANTIZED:
        from compactlm.compress.quantize import quantize_model, quantized_modules

        if quantized_modules(model):
            info["quantized_by"] = "compress quantize (calibrated scales kept)"
        elif calibration is None:
            raise CompactLMError(f"{precision} export needs calibration token sequences")
        else:
            info["calibration_tokens"] = quantize_model(model, precision, calibration)["calibration_tokens"]

    with _quiet():
        from modelopt.torch.export import export_tensorrt_llm_checkpoint

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        try:
            export_tensorrt_llm_checkpoint(
                model,
                decoder_type=decoder_type,
                dtype=getattr(torch, DTYPES[precision]),
                export_dir=out,
                inference_tensor_parallel=tp_size,
            )
        except (AssertionError, ValueError, NotImplementedError) as exc:
            raise CompactLMError(f"modelopt could not export the TensorRT-LLM checkpoint: {exc}") from exc
    info["config_fixes"] = fix_config(out, model.config)
    info |= embedding_record(out, model.config)

    if source_logits is not None:
        info["verification"] = verify_checkpoint(out, model.config, verify_tokens, source_logits)
    return info


def fix_config(folder: Path, hf_config) -> dict:
    """Rewrite config.json with `config_fields`; return {field: [written by modelopt, now]} for what changed."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    from compactlm.compress.arch import head_dim_of

    if config.get("head_size") != head_dim_of(hf_config):
        raise CompactLMError(
            f"modelopt wrote head_size {config.get('head_size')} but the model's head_dim is {head_dim_of(hf_config)}"
        )
    changes = {}
    for key, value in config_fields(hf_config).items():
        if config.get(key, "<missing>") != value:
            changes[key] = [config.get(key, "<missing>"), value]
            config[key] = value
    path.write_text(json.dumps(config, indent=4) + "\n")
    return changes


def embedding_record(folder: Path, hf_config) -> dict:
    """What became of tied embeddings. modelopt exports a tied model's lm_head as its own tensor and writes
    share_embedding_table false: the engine then holds the table twice (same values), which costs memory
    (vocab x hidden) but not accuracy. We keep it: sharing would need TensorRT-LLM to accept the checkpoint
    without lm_head, which cannot be tested on CPU."""
    config = json.loads((Path(folder) / "config.json").read_text())
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    return {
        "tied_embeddings": tied,
        "share_embedding_table": bool(config.get("share_embedding_table")),
        "lm_head_duplicated": tied and not config.get("share_embedding_table"),
    }


# -- reading a checkpoint back


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CompactLMError(f"{folder} is not a TensorRT-LLM checkpoint: config.json is missing")
    return json.loads(path.read_text())


def _rank_tensors(folder: Path, tp: int) -> list[dict]:
    from safetensors.torch import load_file

    ranks = []
    for rank in range(tp):
        file = Path(folder) / f"rank{rank}.safetensors"
        if not file.is_file():
            raise CompactLMError(f"{folder} has tp_size {tp} but {file.name} is missing")
        ranks.append(load_file(file))
    return ranks


def _dequantize(tensors: dict, algo: str | None = None, group_size: int | None = None) -> dict:
    """fp32 copies of one rank's tensors: FP8 / INT8 / packed INT4 weights times their scales, with SmoothQuant's
    and AWQ's pre-quant scales folded into the weight columns (the engine multiplies its input by them);
    scaling factors dropped."""
    import torch

    out = {}
    for name, t in tensors.items():
        if name.endswith((*SCALE_SUFFIXES, "prequant_scaling_factor")):
            continue
        if t.dtype in (torch.int8, torch.uint8) and algo in ("W8A8_SQ_PER_CHANNEL", "W4A16_AWQ"):
            base = name.removesuffix("weight")
            scale = tensors.get(base + "weights_scaling_factor")
            if scale is None:
                raise CompactLMError(f"quantized tensor {name} has no weights_scaling_factor")
            if algo == "W4A16_AWQ":
                from compactlm.compress.unified import unpack_int4

                weight = unpack_int4(t).float() * scale.float().repeat_interleave(int(group_size), dim=1)
            else:
                weight = t.float() * scale.float().reshape(-1, 1)
            pre = tensors.get(base + "prequant_scaling_factor")
            out[name] = weight * pre.float()[None, :] if pre is not None else weight
            continue
        if t.dtype == torch.float8_e4m3fn:
            scale = tensors.get(name.removesuffix("weight") + "weights_scaling_factor")
            if scale is None:
                raise CompactLMError(f"FP8 tensor {name} has no weights_scaling_factor")
            scale = scale.float()
            if scale.numel() == 1:
                t = t.float() * scale.reshape(())
            elif scale.numel() == t.shape[0]:
                t = t.float() * scale.reshape(-1, 1)
            else:
                raise CompactLMError(f"{name}: unsupported FP8 scale shape {tuple(scale.shape)} (per-tensor or row)")
        elif not t.is_floating_point():
            raise CompactLMError(f"{name} has dtype {t.dtype}: only FP16/BF16/FP32 and FP8 weights are read")
        out[name] = t.float()
    return out


def load_trtllm_checkpoint(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, state dict in Hugging Face Llama/Qwen names, fp32) of a TensorRT-LLM checkpoint.

    Merges the tensor-parallel ranks, dequantizes FP8 weights and drops the vocab padding, so that the result
    loads (strict) into the source's HF model class.
    """
    import torch

    folder = Path(folder)
    config = read_config(folder)
    mapping = config.get("mapping", {})
    tp, pp = int(mapping.get("tp_size", 1)), int(mapping.get("pp_size", 1))
    if pp != 1:
        raise CompactLMError(f"{folder} is pipeline-parallel (pp_size {pp}); only tensor-parallel ranks are read")
    algo = (config.get("quantization") or {}).get("quant_algo")
    if algo not in (None, "FP8", "W8A8_SQ_PER_CHANNEL", "W4A16_AWQ"):
        raise CompactLMError(
            f"{folder} is quantized with {algo}; the reader handles FP16/BF16, FP8, W8A8_SQ_PER_CHANNEL and W4A16_AWQ"
        )
    group_size = (config.get("quantization") or {}).get("group_size")
    ranks = [_dequantize(t, algo, group_size) for t in _rank_tensors(folder, tp)]
    heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_size"]
    vocab = config["vocab_size"]
    q_rows, kv_rows = heads // tp * head_dim, max(1, kv_heads // tp) * head_dim
    kv_ranks = list(range(0, tp, max(1, tp // kv_heads)))  # one rank per distinct KV slice (copies skipped)

    def rows(name: str) -> torch.Tensor:
        return torch.cat([r[name] for r in ranks], dim=0)

    def cols(name: str) -> torch.Tensor:
        return torch.cat([r[name] for r in ranks], dim=1)

    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(trt: str, hf: str, how) -> None:
        if trt in ranks[0]:
            state[hf] = how(trt)
            used.add(trt)

    embed_dim = config.get("embedding_sharding_dim", 0) if config.get("use_parallel_embedding") else None
    take(
        "transformer.vocab_embedding.weight",
        "model.embed_tokens.weight",
        lambda n: (ranks[0][n] if embed_dim is None else torch.cat([r[n] for r in ranks], dim=embed_dim))[:vocab],
    )
    take("transformer.ln_f.weight", "model.norm.weight", lambda n: ranks[0][n])
    take("lm_head.weight", "lm_head.weight", lambda n: rows(n)[:vocab])
    if "lm_head.weight" not in state:
        if not config.get("share_embedding_table"):
            raise CompactLMError(f"{folder} has no lm_head.weight and does not share the embedding table")
        state["lm_head.weight"] = state["model.embed_tokens.weight"]

    for i in range(config["num_hidden_layers"]):
        trt, hf = f"transformer.layers.{i}.", f"model.layers.{i}."
        if trt + "attention.qkv.weight" not in ranks[0]:
            raise CompactLMError(f"{folder} has no {trt}attention.qkv.weight")
        for kind in ("weight", "bias"):
            name = f"{trt}attention.qkv.{kind}"
            if name not in ranks[0]:
                continue
            used.add(name)
            parts = [r[name].split([q_rows, kv_rows, kv_rows], dim=0) for r in ranks]
            state[f"{hf}self_attn.q_proj.{kind}"] = torch.cat([p[0] for p in parts], dim=0)
            state[f"{hf}self_attn.k_proj.{kind}"] = torch.cat([parts[r][1] for r in kv_ranks], dim=0)
            state[f"{hf}self_attn.v_proj.{kind}"] = torch.cat([parts[r][2] for r in kv_ranks], dim=0)
        for trt_name, hf_name, how in (
            ("attention.dense.weight", "self_attn.o_proj.weight", cols),
            ("attention.dense.bias", "self_attn.o_proj.bias", lambda n: ranks[0][n]),
            ("mlp.fc.weight", "mlp.gate_proj.weight", rows),
            ("mlp.fc.bias", "mlp.gate_proj.bias", rows),
            ("mlp.gate.weight", "mlp.up_proj.weight", rows),
            ("mlp.gate.bias", "mlp.up_proj.bias", rows),
            ("mlp.proj.weight", "mlp.down_proj.weight", cols),
            ("mlp.proj.bias", "mlp.down_proj.bias", lambda n: ranks[0][n]),
            ("input_layernorm.weight", "input_layernorm.weight", lambda n: ranks[0][n]),
            ("post_layernorm.weight", "post_attention_layernorm.weight", lambda n: ranks[0][n]),
            ("attention.q_layernorm.weight", "self_attn.q_norm.weight", lambda n: ranks[0][n]),
            ("attention.k_layernorm.weight", "self_attn.k_norm.weight", lambda n: ranks[0][n]),
        ):
            take(trt + trt_name, hf + hf_name, how)

    unknown = sorted(set(ranks[0]) - used)
    if unknown:
        raise CompactLMError(f"{folder} has tensors the reader does not map: {', '.join(unknown[:5])}")
    return config, state


def activation_scales(folder: str | Path) -> dict[str, float]:
    """Static FP8 input scales by HF linear module name (max over ranks); empty for unquantized checkpoints."""
    from safetensors import safe_open

    folder = Path(folder)
    tp = int(read_config(folder).get("mapping", {}).get("tp_size", 1))
    targets = {
        "attention.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "attention.dense": ("self_attn.o_proj",),
        "mlp.fc": ("mlp.gate_proj",),
        "mlp.gate": ("mlp.up_proj",),
        "mlp.proj": ("mlp.down_proj",),
    }
    scales: dict[str, float] = {}
    for rank in range(tp):
        with safe_open(folder / f"rank{rank}.safetensors", framework="pt") as f:
            for name in f.keys():
                if not name.endswith(".activation_scaling_factor") or not name.startswith("transformer.layers."):
                    continue
                _, _, layer, rest = name.removesuffix(".activation_scaling_factor").split(".", 3)
                for hf in targets.get(rest, ()):
                    key = f"model.layers.{layer}.{hf}"
                    scales[key] = max(scales.get(key, 0.0), float(f.get_tensor(name).float().max()))
    return scales


@contextlib.contextmanager
def fp8_activations(model, scales: dict[str, float]) -> Iterator[None]:
    """Round the inputs of the FP8 linears to float8_e4m3fn with their static scales, as the FP8 GEMMs do."""
    import torch

    def hook(scale: float):
        def pre(_module, args):
            x = args[0]
            q = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype) * scale
            return (q, *args[1:])

        return pre

    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_pre_hook(hook(s)) for name, s in scales.items() if name in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def reference_model(hf_config, state: dict[str, torch.Tensor]):
    """A fresh fp32 HF model of `hf_config` holding `state` (strict: every weight must be there)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CompactLMError(
            f"the checkpoint does not fit the source model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model.eval()


def compare_logits(source: torch.Tensor, exported: torch.Tensor, tokens: torch.Tensor) -> dict:
    """Max/mean |logit error|, mean KL(source || exported) per token, next-token loss of both (and their
    difference), top-1 agreement."""
    import torch.nn.functional as F

    def loss(logits) -> float:
        return float(F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()))

    error = (exported - source).abs()
    log_p, log_q = source.log_softmax(-1), exported.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    source_loss, exported_loss = loss(source), loss(exported)
    return {
        "max_logit_error": round(float(error.max()), 6),
        "mean_logit_error": round(float(error.mean()), 6),
        "mean_kl": round(float(kl), 6),
        "source_loss": round(source_loss, 5),
        "loss": round(exported_loss, 5),
        "loss_delta": round(exported_loss - source_loss, 5),
        "top1_agreement": round(float((exported.argmax(-1) == source.argmax(-1)).float().mean()), 4),
    }


def verify_checkpoint(folder: Path, hf_config, tokens: torch.Tensor, source_logits: torch.Tensor) -> dict:
    """Read `folder` back into a fresh HF model and compare its logits on `tokens` with `source_logits`.

    FP8 checkpoints are compared twice: dequantized weights only, and with the inputs of the FP8 linears rounded
    to FP8 with their static scales ("fp8_activations"), which is closer to what the engine computes.
    """
    import torch

    config, state = load_trtllm_checkpoint(folder)
    model = reference_model(hf_config, state)
    result = {"sequences": int(tokens.shape[0]), "tokens_per_sequence": int(tokens.shape[1])}
    fp8 = (config.get("quantization") or {}).get("quant_algo") == "FP8"  # INT8 SQ's activation scales are not FP8's
    with torch.inference_mode():
        result |= compare_logits(source_logits, model(input_ids=tokens, use_cache=False).logits.float(), tokens)
        scales = activation_scales(folder) if fp8 else {}
        if scales:
            with fp8_activations(model, scales):
                logits = model(input_ids=tokens, use_cache=False).logits.float()
            result["fp8_activations"] = compare_logits(source_logits, logits, tokens)
    return result


def _quiet():
    from compactlm.compress.unified import quiet

    return quiet()
