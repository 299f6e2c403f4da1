"""The quantized checkpoint format: a Hugging Face folder whose weights include modelopt's calibrated quantizer state,
with `modelopt_state.pth` beside them (which quantizers sit where). Reading it back restores the quantizers; a
plain `from_pretrained` would read a wrong model (SmoothQuant and AWQ fold their smoothing into the weights)."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

from compactlm.compress.record import read_record
from compactlm.core.errors import CompactLMError

STATE_FILE = "modelopt_state.pth"
"""modelopt's name for it (its Hugging Face plugin reads the same file)."""


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """modelopt prints banners and warns about transformers versions and a missing tensorrt_llm."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def quantized_format(path: str | os.PathLike, record: dict | None = None) -> str | None:
    """The format a checkpoint folder was quantized with (read from its record), or None for a plain one."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        return None
    record = record or read_record(path) or {}
    ops = [op for op in record.get("history", []) if op.get("op") == "quantize"]
    return ops[-1]["format"] if ops else "modelopt"


def load_quantized(path: Path, files, dtype=None):
    """Rebuild a modelopt-quantized checkpoint: the plain model, its quantizers restored, then every weight and
    quantizer buffer loaded (strict)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    with quiet():
        import modelopt.torch.opt as mto

        config = AutoConfig.from_pretrained(path)
        from transformers.initialization import no_init_weights

        with no_init_weights():  # every weight is loaded below
            model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
        # modelopt's state holds its config objects: a pickle, from a file compactlm itself wrote beside the weights
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
        model = mto.restore_from_modelopt_state(model, state)
    weights = {}
    for file in files:
        weights.update(load_file(file))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise CompactLMError(
            f"{path}: the weights do not fit the restored quantized model (missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    if tied:
        model.tie_weights()
    return model.eval()
