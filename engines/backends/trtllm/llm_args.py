"""The LLM arguments of an engine folder (`llm_args.yaml`): what `tensorrt_llm.LLM(model, **args)`,
`trtllm-serve --config`, `trtllm-bench --config` and Triton's llmapi `model.yaml` take, sized from the limits.

Field names and value types are checked against TensorRT-LLM's own TorchLlmArgs (torch_llm_args.json: the field
list taken from tensorrt_llm/llmapi/llm_args.py, commit cited there). TorchLlmArgs forbids unknown fields, so a
wrong name here would stop the server at start-up on the GPU host; the check stops it at build time instead.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from compactlm.core.errors import CompactLMError
from compactlm.engines.config import BuildConfig

LLM_ARGS_FILE = "llm_args.yaml"
FIELDS_FILE = Path(__file__).with_name("torch_llm_args.json")
KV_CACHE_FRACTION = 0.9
"""Share of the GPU memory left after the weights that the KV cache takes (TensorRT-LLM's default)."""
NESTED = {"KvCacheConfig": "KvCacheConfig", "Optional[CudaGraphConfigType]": "CudaGraphConfig"}
"""Annotation of a TorchLlmArgs field -> the table in torch_llm_args.json that lists its sub-fields."""


@functools.cache
def reference() -> dict:
    """torch_llm_args.json: {"source", "TorchLlmArgs": {field: annotation}, "KvCacheConfig": ..., ...}."""
    return json.loads(FIELDS_FILE.read_text())


def shape_args(tp_size: int, limits) -> dict:
    """The LLM arguments that restate the engine's parallelism and limits (what must agree with engine.json)."""
    return {
        "tensor_parallel_size": tp_size,
        "max_batch_size": limits.max_batch_size,
        "max_input_len": limits.max_input_len,
        "max_seq_len": limits.max_seq_len,
        "max_num_tokens": limits.max_num_tokens,
    }


def llm_args(config: BuildConfig) -> dict:
    """The LLM arguments of a build: parallelism, the limits, the KV cache and CUDA graphs up to the batch size."""
    limits = config.limits
    args = {
        **shape_args(config.tp_size, limits),
        "kv_cache_config": {"free_gpu_memory_fraction": KV_CACHE_FRACTION, "enable_block_reuse": True},
        "cuda_graph_config": {"max_batch_size": limits.max_batch_size, "enable_padding": True},
    }
    if limits.max_num_tokens < limits.max_input_len:
        args["enable_chunked_prefill"] = True  # a prompt longer than one step's token budget is prefilled in chunks
    check_llm_args(args)
    return args


def _accepts(annotation: str, value) -> bool:
    """Whether `value` (a plain YAML value) fits a pydantic annotation as written in llm_args.py."""
    literal = re.search(r"Literal\[(.*?)\]", annotation)
    if literal and isinstance(value, str):
        options = [o.strip().strip("'\"") for o in literal.group(1).split(",")]
        if value in options:
            return True
    if value is None:
        return annotation.startswith("Optional[")
    if isinstance(value, bool):
        return re.search(r"\bbool\b", annotation) is not None
    if isinstance(value, int):
        return re.search(r"\b(int|PositiveInt|NonNegativeInt)\b", annotation) is not None
    if isinstance(value, float):
        return re.search(r"\b(float|NonNegativeFloat)\b", annotation) is not None
    if isinstance(value, str):
        return re.search(r"\bstr\b", annotation) is not None
    if isinstance(value, list):
        return "List[" in annotation or "list[" in annotation
    return False


def check_llm_args(args: dict) -> None:
    """Refuse a field TorchLlmArgs does not have, or a value of the wrong type, naming the reference."""
    ref = reference()
    where = f"TensorRT-LLM's TorchLlmArgs ({ref['source'].split(' at commit ')[0]})"
    for name, value in args.items():
        annotation = ref["TorchLlmArgs"].get(name)
        if annotation is None:
            raise CompactLMError(f"LLM argument {name!r} is not a field of {where}")
        table = NESTED.get(annotation)
        if table is not None and isinstance(value, dict):
            for key, sub in value.items():
                sub_annotation = ref[table].get(key)
                if sub_annotation is None:
                    raise CompactLMError(f"LLM argument {name}.{key} is not a field of {table} ({where})")
                if not _accepts(sub_annotation, sub):
                    raise CompactLMError(f"LLM argument {name}.{key}={sub!r} does not fit {sub_annotation}")
        elif not _accepts(annotation, value):
            raise CompactLMError(f"LLM argument {name}={value!r} does not fit {annotation} ({where})")


def write_llm_args(path: Path, args: dict) -> None:
    import yaml

    check_llm_args(args)
    header = "# LLM arguments for tensorrt_llm.LLM / trtllm-serve --config (written by compactlm)\n"
    header += f"# fields checked against {reference()['source']}\n"
    path.write_text(header + yaml.safe_dump(args, sort_keys=False))


def read_llm_args(path: Path) -> dict:
    from compactlm.core.config import load_yaml

    if not path.is_file():
        raise CompactLMError(f"{path} is missing: the engine folder is incomplete, rebuild it")
    args = load_yaml(path, "LLM arguments file", empty_ok=True).data
    check_llm_args(args)
    return args
