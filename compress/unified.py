"""ModelOpt's unified Hugging Face checkpoint: the quantized artifact TensorRT-LLM (PyTorch backend), vLLM and
SGLang load directly. A Hugging Face folder whose linear weights are stored quantized with their scales,
`hf_quant_config.json` beside them, and `quantization_config` (quant_method "modelopt") in config.json:

    FP8                  weight float8_e4m3fn, weight_scale (per tensor), input_scale (static, per tensor)
    W8A8_SQ_PER_CHANNEL  weight int8, weight_scale (per output row), input_scale, pre_quant_scale (the input's
                         SmoothQuant factors: the engine multiplies its input by them, then quantizes to INT8)
    W4A16_AWQ            weight uint8 (two signed 4-bit rows per byte row), weight_scale [out, in/group],
                         pre_quant_scale where modelopt could not fold it into the preceding norm

`export_unified` writes one (modelopt's `export_hf_checkpoint`) from a model quantized in place by
compactlm.compress.quantize. `load_unified` reads one back on CPU without unpickling anything: the weights are
dequantized with their scales into a plain fp32 model, and the inputs of the quantized linears are rounded the way
the engine's GEMMs round them (FP8 / INT8 with the static input scales), so held-out loss measures what the engine
serves. All modelopt imports happen inside functions.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from compactlm.core.errors import CompactLMError

if TYPE_CHECKING:
    import torch

QUANT_CONFIG = "hf_quant_config.json"
FP8_MAX, INT8_MAX = 448.0, 127.0
ALGOS = {"FP8": "fp8", "W8A8_SQ_PER_CHANNEL": "int8-sq", "W4A16_AWQ": "int4-awq"}
"""quant_algo as the unified checkpoint names it -> compactlm's format name (compactlm.compress.quantize)."""
EXPORT_DTYPES = ("float16", "bfloat16")
"""The dtype of the unquantized tensors (norms, embeddings, lm_head): what the engines run them in."""


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """modelopt prints banners, warns about transformers versions and a missing tensorrt_llm, and logs what its
    export does with tied weights: kept out of the user's terminal."""
    log = logging.getLogger("modelopt")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def read_quant_config(folder: str | Path) -> dict | None:
    """The `quantization` section of hf_quant_config.json, or None for an unquantized folder."""
    path = Path(folder) / QUANT_CONFIG
    if not path.is_file():
        return None
    try:
        quant = json.loads(path.read_text())["quantization"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CompactLMError(f"{path} is not a ModelOpt quantization config: {exc}") from exc
    if not isinstance(quant, dict) or "quant_algo" not in quant:
        raise CompactLMError(f"{path} has no quantization.quant_algo")
    return quant


def unified_format(folder: str | Path) -> str | None:
    """compactlm's name of the format a unified checkpoint holds (fp8, int8-sq, int4-awq), None when unquantized."""
    quant = read_quant_config(folder)
    if quant is None:
        return None
    algo = quant["quant_algo"]
    if algo not in ALGOS:
        raise CompactLMError(
            f"{folder} is quantized as {algo}; compactlm reads {', '.join(ALGOS)} (NVFP4 and MXFP4 need a Blackwell "
            "GPU runtime: serve them with TensorRT-LLM or vLLM directly)"
        )
    return ALGOS[algo]


def export_dtype(hf_config, requested: str | None = None) -> str:
    """The unquantized tensors' dtype: `requested`, else the source's own when it is 16-bit, else bfloat16."""
    if requested is not None:
        if requested not in EXPORT_DTYPES:
            raise CompactLMError(f"export dtype must be one of {', '.join(EXPORT_DTYPES)}, got {requested!r}")
        return requested
    source = str(getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or "")
    source = source.removeprefix("torch.")
    return source if source in EXPORT_DTYPES else "bfloat16"


def export_unified(model, out: Path, dtype: str = "bfloat16") -> dict:
    """Write `model` (quantized in place by modelopt, fake-quant) as a unified HF checkpoint into `out` (which
    exists). Returns the quantization section written."""
    import torch

    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]  # modelopt reads it to tell text from vision models
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # deprecation and tied-weight notices from the save inside the export
    hf_logging.disable_progress_bar()
    try:
        with quiet():
            from modelopt.torch.export import export_hf_checkpoint

            export_hf_checkpoint(model, dtype=getattr(torch, dtype), export_dir=str(out))
    except (AssertionError, ValueError, NotImplementedError, TypeError, KeyError) as exc:
        raise CompactLMError(f"modelopt could not export the unified HF checkpoint: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    quant = read_quant_config(out)
    if quant is None:
        raise CompactLMError(f"modelopt wrote no {QUANT_CONFIG}: the model was not quantized")
    return quant


# -- reading back


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[out/2, in] bytes -> [out, in] signed 4-bit values: modelopt packs output rows 2i (low nibble) and 2i+1."""
    import torch

    raw = packed.view(torch.uint8).to(torch.int16)
    low, high = raw & 0x0F, (raw >> 4) & 0x0F
    values = torch.stack([low, high], dim=1).reshape(-1, packed.shape[1])
    return torch.where(values >= 8, values - 16, values)


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor, algo: str, group_size: int | None) -> torch.Tensor:
    """fp32 weight = quantized values x their scales (per tensor, per row, or per group of `group_size` inputs)."""
    import torch

    scale = scale.float()
    if algo == "W4A16_AWQ":
        values = unpack_int4(weight).float()
        if scale.shape != (values.shape[0], values.shape[1] // int(group_size)):
            raise CompactLMError(
                f"INT4 scale of shape {tuple(scale.shape)} does not fit a weight {tuple(values.shape)}"
            )
        return values * scale.repeat_interleave(int(group_size), dim=1)
    if weight.dtype not in (torch.float8_e4m3fn, torch.int8):
        raise CompactLMError(f"a {algo} weight is stored as {weight.dtype}")
    values = weight.float()
    if scale.numel() == 1:
        return values * scale.reshape(())
    if scale.numel() == values.shape[0]:
        return values * scale.reshape(-1, 1)
    raise CompactLMError(f"unsupported weight scale of shape {tuple(scale.shape)} (per tensor or per row)")


def read_unified(folder: str | Path, files) -> tuple[dict, dict[str, torch.Tensor], dict[str, dict]]:
    """(quantization section, fp32 state dict in the source's names, {linear name: its input quantization}).

    The input quantization of a linear is {"kind": "fp8"|"int8", "scale": float, "pre": tensor or None}: what the
    engine does to the linear's input before its low-precision GEMM. W4A16's inputs stay 16-bit: its
    pre_quant_scale is folded into the weight's columns instead (exact).
    """
    from safetensors.torch import load_file

    quant = read_quant_config(folder)
    if quant is None:
        raise CompactLMError(f"{folder} has no {QUANT_CONFIG}: not a unified quantized checkpoint")
    unified_format(folder)  # refuses the algorithms we cannot read
    algo, group = quant["quant_algo"], quant.get("group_size")
    raw: dict[str, torch.Tensor] = {}
    for file in files:
        raw.update(load_file(file))
    state: dict[str, torch.Tensor] = {}
    inputs: dict[str, dict] = {}
    for name, tensor in raw.items():
        if name.endswith((".weight_scale", ".input_scale", ".pre_quant_scale", "_scale_2")):
            continue
        base = name.removesuffix(".weight")
        scale = raw.get(base + ".weight_scale") if name.endswith(".weight") else None
        if scale is None:
            if not tensor.is_floating_point() or tensor.dtype == _fp8():
                raise CompactLMError(f"{folder}: quantized tensor {name} has no weight_scale")
            state[name] = tensor.float()
            continue
        weight = dequantize_weight(tensor, scale, algo, group)
        pre = raw.get(base + ".pre_quant_scale")
        if algo == "W4A16_AWQ":
            state[name] = weight * pre.float()[None, :] if pre is not None else weight
            continue
        state[name] = weight
        input_scale = raw.get(base + ".input_scale")
        if input_scale is None:
            raise CompactLMError(f"{folder}: {algo} linear {base} has no input_scale (static activation scale)")
        inputs[base] = {
            "kind": "fp8" if algo == "FP8" else "int8",
            "scale": float(input_scale.float().max()),
            "pre": pre.float() if pre is not None else None,
        }
    return quant, state, inputs


def _fp8():
    import torch

    return torch.float8_e4m3fn


def quantize_inputs(model, inputs: dict[str, dict]) -> int:
    """Round the inputs of the quantized linears as the engine's GEMMs do (persistent forward pre-hooks).
    Returns how many linears were hooked."""
    import torch

    def hook(kind: str, scale: float, pre):
        def pre_hook(_module, args):
            x = args[0]
            if pre is not None:
                x = x * pre.to(x.dtype)
            if kind == "fp8":
                q = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype) * scale
            else:
                q = (x / scale).round().clamp(-INT8_MAX - 1, INT8_MAX) * scale
            return (q, *args[1:])

        return pre_hook

    modules = dict(model.named_modules())
    missing = sorted(set(inputs) - set(modules))
    if missing:
        raise CompactLMError(f"the checkpoint quantizes modules the model does not have: {', '.join(missing[:3])}")
    for name, spec in inputs.items():
        modules[name].register_forward_pre_hook(hook(spec["kind"], spec["scale"], spec["pre"]))
    return len(inputs)


def load_unified(folder: str | Path, files, dtype=None):
    """A unified quantized checkpoint as a plain fp32 HF model: weights dequantized, inputs of the quantized
    linears rounded as the engine rounds them. Nothing is unpickled."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    folder = Path(folder)
    quant, state, inputs = read_unified(folder, files)
    config = AutoConfig.from_pretrained(folder)
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)  # the weights below are plain: no transformers quantizer
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise CompactLMError(
            f"{folder}: the weights do not fit the model (missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    if tied:
        model.tie_weights()
    model.compactlm_quantized_inputs = quantize_inputs(model, inputs)
    model.compactlm_quantization = quant
    return model.eval()
