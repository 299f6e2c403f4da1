"""The unified quantized checkpoint read back on CPU vs the fake-quant model it was exported from: held-out loss of
SmolLM2-135M (8 x 256 python-docs tokens) for fp8, int8-sq and int4-awq. Writes docs/engines/unified-readback.json."""

import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from compactlm.compress.checkpoint import load_model, load_tokenizer
from compactlm.compress.data import load_sequences
from compactlm.compress.quantize import QuantizeConfig, calibration_batches, quantize_model, save_quantized

tok = load_tokenizer("smollm2-135m")
held = load_sequences("python-docs", tok, num_sequences=8, seq_len=256, split="heldout")


def loss(m):
    with torch.inference_mode():
        logits = m(input_ids=held, use_cache=False).logits.float()
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1), held[:, 1:].flatten()))


out = {}
for fmt in ["fp8", "int8-sq", "int4-awq"]:
    m = load_model("smollm2-135m")
    base = loss(m)
    cfg = QuantizeConfig(fmt, calib_samples=32, calib_seq_len=256 if fmt != "int4-awq" else 256)
    info = quantize_model(m, fmt, calibration_batches(m.compactlm_path, cfg))
    fq = loss(m)
    with tempfile.TemporaryDirectory() as d:
        save_quantized(m, Path(d) / "q", Path(m.compactlm_path), {"op": "quantize", **info}, dtype="bfloat16")
        back = loss(load_model(Path(d) / "q"))
    out[fmt] = dict(
        source=round(base, 4),
        fake_quant=round(fq, 4),
        unified_read_back=round(back, 4),
        read_back_minus_fake=round(back - fq, 4),
    )
    print(fmt, out[fmt], flush=True)
Path("docs/engines/unified-readback.json").write_text(json.dumps(out, indent=1) + "\n")
