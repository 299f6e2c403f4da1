"""Export a Hugging Face checkpoint to OpenVINO IR with optimum-intel, in an isolated virtual environment.

optimum-intel 2.2 (the exporter) requires transformers < 5.6 while compactlm runs on transformers 5.23, so the
exporter lives in its own venv (core/toolvenv.py), made once under $COMPACTLM_HOME/venvs and reused; running an
exported model needs only openvino + openvino-genai, which sit in compactlm's own environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from compactlm.core import procs, toolvenv
from compactlm.core.errors import CompactLMError
from compactlm.core.toolvenv import ToolVenv

REQUIREMENTS = (
    "torch==2.13.0",  # the local CPU wheel; anything newer drags a multi-GB CUDA build
    "transformers==5.5.4",
    "huggingface-hub<1.22",
    "optimum==2.3.0",
    "optimum-intel==2.2.0",
    "nncf==3.4.0",  # int8/int4 weight compression
    "openvino==2026.4.1",
    "openvino-tokenizers==2026.4.1.0",  # converts the tokenizer for openvino-genai
    "accelerate",
    "safetensors",
)
VENV_ENV = "COMPACTLM_OPENVINO_EXPORTER_VENV"
WEIGHT_FORMATS = ("fp32", "int8", "int4")


def venv_dir() -> Path:
    """Where the exporter venv lives: $COMPACTLM_OPENVINO_EXPORTER_VENV, else a folder named by its requirements."""
    if os.environ.get(VENV_ENV):
        return Path(os.environ[VENV_ENV]).expanduser()
    from compactlm.compress.models import compactlm_home

    tag = hashlib.sha256("\n".join(REQUIREMENTS).encode()).hexdigest()[:10]
    return compactlm_home() / "venvs" / f"openvino-export-{tag}"


EXPORTER = ToolVenv(
    "the OpenVINO exporter",
    installs=(("torch==2.13.0",), REQUIREMENTS),
    # optimum-intel pulls torchvision, whose PyPI build does not load beside this torch wheel
    # ("operator torchvision::nms does not exist") and breaks transformers' imports: the export needs none.
    remove=("torchvision",),
    check="import optimum.intel, openvino_tokenizers, nncf",
)


def is_ready(venv: Path | None = None) -> bool:
    return toolvenv.is_ready(venv or venv_dir())


def _run(cmd: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    result = procs.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise CompactLMError(f"{what} failed (exit {result.returncode}):\n{tail}")
    return result


def ensure_exporter(quiet: bool = False) -> Path:
    """The exporter venv's python, making the venv first if needed (~1 min, once; needs the package registry)."""
    return toolvenv.ensure(EXPORTER, venv_dir(), quiet=quiet)


def int4_group_size(model_config) -> int:
    """The largest of 128/64/32/16 that divides every matmul input width (576 is not a multiple of 128)."""
    from compactlm.compress.arch import head_dim_of

    widths = (
        model_config.hidden_size,
        model_config.intermediate_size,
        model_config.num_attention_heads * head_dim_of(model_config),
        *(
            getattr(model_config, k)
            for k in ("moe_intermediate_size", "shared_expert_intermediate_size")
            if getattr(model_config, k, None)
        ),
    )
    for group in (128, 64, 32, 16):
        if all(w % group == 0 for w in widths):
            return group
    raise CompactLMError(f"int4 needs matmul widths divisible by 16; this model has {widths}: use int8 or fp32")


# Data-aware int4 (AWQ + scale estimation, NNCF through optimum-intel's Python API: its CLI only takes datasets
# from the Hugging Face hub), run with the exporter venv's python.
_INT4_AWQ = """
import json, sys
from optimum.intel import OVModelForCausalLM, OVWeightQuantizationConfig
ckpt, out, calib, group = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
texts = json.load(open(calib))
config = OVWeightQuantizationConfig(
    bits=4, sym=True, group_size=group, ratio=1.0, dataset=texts, tokenizer=ckpt,
    awq=True, scale_estimation=True, num_samples=len(texts),
)
OVModelForCausalLM.from_pretrained(ckpt, export=True, quantization_config=config).save_pretrained(out)
from transformers import AutoTokenizer
from optimum.exporters.openvino.convert import export_tokenizer
export_tokenizer(AutoTokenizer.from_pretrained(ckpt), out)
"""


# optimum-intel 2.2 gates its Gemma export configs (Gemma 2 and Gemma 3 text inherit Gemma's) at transformers <= 5.0
# (MAX_TRANSFORMERS_VERSION, checked before export); the exporter venv runs 5.5.4. Its maintainers point to a custom
# export config for exactly this (optimum-intel issue #1562); raising the class's limit in the exporter process does
# the same for the CLI. compactlm checks every Gemma export against transformers' greedy tokens, sliding window and
# soft-capping on (tests/unit/engines/test_cpu_engine.py).
_GEMMA_GATE = """
from optimum.exporters.openvino import model_configs
model_configs.GemmaOpenVINOConfig.MAX_TRANSFORMERS_VERSION = "5.5.99"
"""
GATED = ("gemma2", "gemma3_text")
"""Families whose export needs `_GEMMA_GATE`."""
_CLI = """
import sys
from optimum.commands.optimum_cli import main
sys.argv = ["optimum-cli", *sys.argv[1:]]
main()
"""


def _env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)  # compactlm's own site-packages must not leak into the exporter
    return env


def export_openvino(
    checkpoint: Path, out: Path, weight_format: str, model_config, calibration: list[str] | None = None
) -> dict:
    """Run optimum-intel's exporter: OpenVINO IR with a stateful KV cache, plus the converted tokenizer.

    int4 with `calibration` texts is data-aware (AWQ + scale estimation on those texts); without, data-free.
    """
    if weight_format not in WEIGHT_FORMATS:
        raise CompactLMError(f"unknown weight format {weight_format!r}; choose from {', '.join(WEIGHT_FORMATS)}")
    python = ensure_exporter()
    prelude = _GEMMA_GATE if model_config.model_type in GATED else ""
    if weight_format == "int4" and calibration:
        group = int4_group_size(model_config)
        texts = out.parent / f".{out.name}.calibration.json"
        texts.write_text(json.dumps(calibration))
        try:
            cmd = [str(python), "-c", prelude + _INT4_AWQ, str(checkpoint), str(out), str(texts), str(group)]
            _run(cmd, f"exporting {checkpoint} to OpenVINO int4 (AWQ)", env=_env())
        finally:
            texts.unlink(missing_ok=True)
        return {
            "weight_format": "int4",
            "int4_group_size": group,
            "int4_symmetric": True,
            "int4_method": f"AWQ + scale estimation on {len(calibration)} calibration texts",
            "tokenizer_converted": (out / "openvino_tokenizer.xml").is_file(),
        }
    cmd = [
        str(python), "-c", prelude + _CLI, "export", "openvino",
        "--model", str(checkpoint), "--task", "text-generation-with-past", "--library", "transformers",
        "--weight-format", weight_format,
    ]  # fmt: skip
    info = {"weight_format": weight_format}
    if weight_format == "int4":
        group = int4_group_size(model_config)
        cmd += ["--sym", "--group-size", str(group), "--ratio", "1.0"]
        info.update(int4_group_size=group, int4_symmetric=True, int4_method="data-free")
    cmd.append(str(out))
    _run(cmd, f"exporting {checkpoint} to OpenVINO", env=_env())
    if not (out / "openvino_model.xml").is_file():
        raise CompactLMError(f"the OpenVINO export of {checkpoint} wrote no openvino_model.xml")
    info["tokenizer_converted"] = (out / "openvino_tokenizer.xml").is_file()
    return info
