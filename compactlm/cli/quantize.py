"""`compactlm compress quantize`: post-training quantization with nvidia-modelopt."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from compactlm.core.console import console


def register(app: typer.Typer) -> None:
    @app.command("quantize")
    def quantize_cmd(
        model: Annotated[str, typer.Argument(help="A checkpoint directory or a bundled model's name.")],
        out: Annotated[Path, typer.Argument(help="Output checkpoint directory (written atomically).")],
        format: Annotated[str, typer.Option("--format", help="fp8 | int8-sq | int4-awq.")],
        calib_data: Annotated[
            str, typer.Option(help="Calibration text (train split): a bundled corpus, a .txt/.jsonl file or a folder.")
        ] = "python-docs",
        calib_samples: Annotated[int, typer.Option(help="Calibration sequences.")] = 32,
        calib_seq_len: Annotated[int, typer.Option(help="Tokens per calibration sequence.")] = 256,
        block_size: Annotated[
            int | None, typer.Option(help="int4-awq group size (default: the largest of 128/64/32/16 that fits).")
        ] = None,
        dtype: Annotated[
            str | None,
            typer.Option(help="float16 | bfloat16 for the unquantized tensors (default: the source's if 16-bit)."),
        ] = None,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
    ) -> None:
        """Post-training quantization with nvidia-modelopt, calibrated on text, written as ModelOpt's unified HF
        checkpoint (safetensors + hf_quant_config.json: TensorRT-LLM, vLLM and SGLang load it). Measure its cost with
        `compress eval MODEL OUT`; deploy it with `engines build OUT ENGINE --backend trtllm --precision FORMAT`."""
        from compactlm.compress.quantize import FORMATS, QuantizeConfig, quantize_checkpoint

        cfg = QuantizeConfig(
            format=format,
            calib_data=calib_data,
            calib_samples=calib_samples,
            calib_seq_len=calib_seq_len,
            block_size=block_size,
            dtype=dtype,
        )
        with console.status(f"quantizing {model} to {format} ({FORMATS[format].description})"):
            record = quantize_checkpoint(model, out, cfg, overwrite=overwrite)
        group = f", INT4 group size {record['block_size']}" if "block_size" in record else ""
        console.print(
            f"[green]quantized[/] {model} -> [bold]{out}[/] as {format} ({record['trtllm_algo']}{group}), calibrated "
            f"on {record['calibration_tokens']:,} tokens in {record['seconds']:.0f} s; unified HF checkpoint, "
            f"{record['export_dtype']} elsewhere"
        )
        console.print(
            f"next: compactlm compress eval {model} {out}   |   compactlm engines build {out} ENGINE --backend trtllm "
            f"--precision {format}",
            highlight=False,
            soft_wrap=True,
        )
