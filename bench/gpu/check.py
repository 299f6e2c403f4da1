#!/usr/bin/env python3
"""The prepared GPU check: four short steps on one CUDA GPU, one result line each, a JSON of all of them.

    bench/gpu/check.sh [--dry-run] [--wheels DIR] [--out DIR]   # the wrapper: installs carried wheels, offline
    python bench/gpu/check.py [--dry-run] [--out DIR] [--only NAME,...] [--budget S] [--modelopt-cuda-ext]

torch-cuda-bf16: a `torch` bf16 engine built, loaded and run (that backend has no device option: CPU), then its
weights with transformers on the GPU: greedy decoding, first-step logits against fp32 on CPU, tokens/s.
distill-step-bf16: compactlm's Distillation objective, 5 AdamW steps on a fixed batch under bf16 autocast.
fsdp-torchrun-1proc: `compactlm compress distill --parallel fsdp` under torchrun, one process.
modelopt-fp8-ptq: quantize_model(fp8) on the GPU, export_unified, load_unified on CPU, logits compared.
--dry-run: the same on CPU with smaller tiny models (gloo, CPU fake quant), lines marked DRY-RUN (CPU). Exit
status 0 iff no FAIL. compactlm comes from this working tree, laid out as installed by a folder of symlinks.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
STEPS = ("torch-cuda-bf16", "distill-step-bf16", "fsdp-torchrun-1proc", "modelopt-fp8-ptq")
LIMITS = {"torch-cuda-bf16": 90, "distill-step-bf16": 60, "fsdp-torchrun-1proc": 180, "modelopt-fp8-ptq": 120}
"""Seconds each step may take; together they fit the 450 s default budget (8 minutes with start-up)."""
SHAPE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "max_position_embeddings")
SIZES = {"gpu": (512, 128, 256, 4, 256), "cpu": (256, 64, 128, 2, 128)}
"""Tiny Llamas: the GPU run's and the dry run's, in SHAPE's order."""
WORDS = [a + b for a in ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo") for b in ("n", "r", "s", "te", "ba", "")]


class CheckFailed(Exception):
    """A step ran but its numbers are out of bounds, or it ran out of time."""


class Skipped(Exception):
    """A step cannot run here (with the reason)."""


def package_dirs() -> dict[str, str]:
    """pyproject.toml's [tool.setuptools.package-dir] (import name -> folder), read without tomllib (3.10)."""
    section = (REPO / "pyproject.toml").read_text().split("[tool.setuptools.package-dir]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^\s*"([\w.]+)"\s*=\s*"([^"]+)"', section, re.M))


def tree_on_path(tmp: Path) -> Path:
    """Symlink the working tree's folders into the layout `pip install .` gives, put it first on sys.path and
    PYTHONPATH (the torchrun worker inherits it): `compactlm.compress` is compress/, and so on."""
    mapping = package_dirs()
    root = (farm := tmp / "src") / "compactlm"
    root.mkdir(parents=True)
    for entry in (REPO / mapping["compactlm"]).iterdir():
        if entry.name != "__pycache__":
            (root / entry.name).symlink_to(entry)
    for name, folder in mapping.items():
        if name != "compactlm":
            root.joinpath(*name.split(".")[1:]).symlink_to(REPO / folder)
    sys.path.insert(0, str(farm))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(farm), os.environ.get("PYTHONPATH")) if p)
    return farm


def tiny_llama(size: dict, seed: int, std: float, **overrides):
    from transformers import AutoModelForCausalLM, LlamaConfig

    kwargs = dict(size, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-6)
    kwargs["head_dim"] = kwargs["hidden_size"] // 4
    config = LlamaConfig(**(kwargs | overrides))
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # wider than HF's 0.02 init: logits with clear winners, so top-1 comparisons mean something
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, std)
    return model.eval()


def tokens(n: int, length: int, vocab: int, seed: int):
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


class Context:
    def __init__(self, args, tmp: Path):
        self.args, self.tmp, self.dry = args, tmp, args.dry_run
        self.size = dict(zip(SHAPE, SIZES["cpu" if self.dry else "gpu"], strict=True))
        self._checkpoints: dict | None = None

    @property
    def device(self):
        if self.dry:
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise CheckFailed("CUDA is not available (on a machine without a GPU, use --dry-run)")
        return torch.device("cuda")

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def checkpoints(self) -> dict:
        """A teacher and a shallower student on disk with one word-level tokenizer, and a JSONL corpus (once)."""
        if self._checkpoints is None:
            import random

            from tokenizers import Tokenizer, models, pre_tokenizers, trainers
            from transformers import PreTrainedTokenizerFast

            rng = random.Random(0)
            texts = [" ".join(rng.choice(WORDS) for _ in range(40)) + " ." for _ in range(120)]
            corpus = self.tmp / "corpus.jsonl"
            corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
            word = Tokenizer(models.WordLevel(unk_token="<unk>"))
            word.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
            trainer = trainers.WordLevelTrainer(vocab_size=self.size["vocab_size"], special_tokens=["<unk>", "<eos>"])
            word.train_from_iterator(texts, trainer)
            tokenizer = PreTrainedTokenizerFast(tokenizer_object=word, eos_token="<eos>", unk_token="<unk>")
            teacher, student, layers = self.tmp / "teacher", self.tmp / "student", self.size["num_hidden_layers"]
            for folder, seed, extra in ((teacher, 1, {}), (student, 2, {"num_hidden_layers": layers // 2})):
                tiny_llama(self.size, seed, 0.1, **extra).save_pretrained(folder)
                tokenizer.save_pretrained(folder)
            self._checkpoints = {"teacher": teacher, "student": student, "corpus": corpus}
        return self._checkpoints


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def step_torch_bf16(ctx: Context) -> tuple[str, dict]:
    from transformers import AutoModelForCausalLM

    from compactlm.compress.checkpoint import load_model
    from compactlm.engines.build import build_engine
    from compactlm.engines.config import BuildConfig, Limits
    from compactlm.engines.registry import load_engine

    device, batch, prompt_len, new = ctx.device, 4, 8, 16
    source = ctx.checkpoints()["teacher"]
    limits = Limits(max_batch_size=batch, max_input_len=32, max_seq_len=64, max_num_tokens=256)
    config = BuildConfig(backend="torch", precision="bf16", limits=limits)
    engine_dir = build_engine(source, ctx.tmp / "engine-torch-bf16", config)
    prompts = tokens(batch, prompt_len, ctx.size["vocab_size"], seed=5)
    with load_engine(engine_dir) as engine:
        engine_device = str(next(engine.model.parameters()).device)
        completions = engine.generate(prompts.tolist(), max_new_tokens=new, ignore_eos=True)
    if [len(c.tokens) for c in completions] != [new] * batch or any(c.error for c in completions):
        raise CheckFailed(f"the torch engine returned {[len(c.tokens) for c in completions]} tokens, errors "
                          f"{[c.error for c in completions if c.error][:1]}")  # fmt: skip
    # The same bf16 weights (the engine folder's) with transformers on the device.
    model = AutoModelForCausalLM.from_pretrained(engine_dir / "model", dtype=torch.bfloat16).to(device).eval()
    model.generation_config.eos_token_id = None
    reference_model = load_model(source)  # fp32, CPU
    ids = prompts.to(device)
    with torch.inference_mode():
        first = model(input_ids=ids).logits.float().cpu()
        reference = reference_model(input_ids=prompts).logits.float()
        kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
        model.generate(input_ids=ids, max_new_tokens=2, **kwargs)  # warm-up
        ctx.sync()
        start = time.perf_counter()
        out = model.generate(input_ids=ids, max_new_tokens=new, **kwargs)
        ctx.sync()
        gen_s = time.perf_counter() - start
    generated, engine_tokens = out[:, prompt_len:].cpu(), torch.tensor([c.tokens for c in completions])
    numbers = {"dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "engine_device": engine_device,
               "device": str(next(model.parameters()).device), "max_abs_dlogit": float((first - reference).abs().max()),
               "logit_scale": float(reference.abs().max()), "rel_dlogit": rel(first, reference),
               "top1_agree_all_positions": float((first.argmax(-1) == reference.argmax(-1)).float().mean()),
               "top1_agree_first_step": float((first[:, -1].argmax(-1) == reference[:, -1].argmax(-1)).float().mean()),
               "tokens_generated": int(generated.numel()), "tokens_per_s": generated.numel() / gen_s,
               "agree_with_cpu_engine": float((generated == engine_tokens).float().mean())}  # fmt: skip
    text = (
        f"{numbers['device']} {numbers['dtype']}: max|dlogit| {numbers['max_abs_dlogit']:.3f} of "
        f"{numbers['logit_scale']:.1f} vs fp32 CPU (rel {numbers['rel_dlogit']:.4f}), top-1 agree "
        f"{numbers['top1_agree_all_positions']:.3f} (first step {numbers['top1_agree_first_step']:.2f}); "
        f"{numbers['tokens_generated']} tokens at {numbers['tokens_per_s']:.0f} tok/s; torch engine (bf16 on "
        f"{engine_device}: no device option) {batch}x{new} tokens, {numbers['agree_with_cpu_engine']:.2f} agree"
    )
    close = numbers["rel_dlogit"] < 0.05 and numbers["top1_agree_all_positions"] >= 0.9
    if not (bool(torch.isfinite(first).all()) and close):
        raise CheckFailed("bf16 logits too far from fp32: " + text)
    return text, numbers


def step_distill(ctx: Context) -> tuple[str, dict]:
    from compactlm.compress.distill import Distillation
    from compactlm.compress.train import Batch
    from compactlm.compress.train_config import DistillConfig

    device, steps = ctx.device, 5
    teacher = tiny_llama(ctx.size, seed=1, std=0.1).to(device)
    student = tiny_llama(ctx.size, seed=2, std=0.1, num_hidden_layers=ctx.size["num_hidden_layers"] // 2)
    student.to(device).train()
    objective = Distillation(DistillConfig(loss="logit"), "logit", teacher=teacher)
    ids = tokens(4, 64 if not ctx.dry else 32, ctx.size["vocab_size"], seed=7).to(device)
    batch = Batch(indices=torch.arange(len(ids)), input_ids=ids)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, fused=device.type == "cuda")
    losses, dtypes = [], set()
    probe = student.model.layers[0].mlp.down_proj.register_forward_hook(lambda _m, _a, o: dtypes.add(o.dtype))
    start = time.perf_counter()
    for _ in range(steps + 1):  # the last pass only measures the loss after `steps` updates
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _parts = objective.loss(student, batch)
        losses.append(loss.item())
        if len(losses) <= steps:
            loss.backward()
            optimizer.step()
    ctx.sync()
    probe.remove()
    numbers = {"loss_before": losses[0], "loss_after": losses[-1], "losses": losses, "steps": steps,
               "device": str(device), "autocast_dtypes": sorted(str(d).removeprefix("torch.") for d in dtypes),
               "seconds_per_step": (time.perf_counter() - start) / (steps + 1)}  # fmt: skip
    text = (
        f"{device} autocast {'/'.join(numbers['autocast_dtypes'])}: KD loss {losses[0]:.4f} -> {losses[-1]:.4f} "
        f"after {steps} AdamW steps on a fixed batch ({numbers['seconds_per_step'] * 1e3:.0f} ms/step)"
    )
    finite = all(torch.isfinite(torch.tensor(losses)))
    if not finite or losses[-1] >= losses[0] or numbers["autocast_dtypes"] != ["bfloat16"]:
        raise CheckFailed(("non-finite loss: " if not finite else "no bf16 decrease: ") + text)
    return text, numbers


def step_fsdp(ctx: Context, limit: float) -> tuple[str, dict]:
    ckpts = ctx.checkpoints()
    out, info = ctx.tmp / "fsdp-distilled", ctx.tmp / "fsdp-wrap.json"
    steps, batch, seq = 3, 2, 32
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    command += [str(Path(__file__).resolve()), "--worker", str(info), "--", "compress", "distill"]
    command += ["--teacher", str(ckpts["teacher"]), "--student", str(ckpts["student"]), "--out", str(out)]
    command += ["--data", str(ckpts["corpus"]), "--steps", str(steps), "--batch-size", str(batch)]
    command += ["--seq-len", str(seq), "--loss", "logit", "--eval-samples", "0", "--save-every", "0"]
    command += ["--parallel", "fsdp", "--precision", "bf16", "--lr", "1e-3"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    env |= {"CUDA_VISIBLE_DEVICES": ""} if ctx.dry else {}  # a dry run is gloo on CPU even beside a GPU
    log = ctx.tmp / "fsdp-torchrun.log"
    start = time.perf_counter()
    with open(log, "w") as sink:
        proc = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=ctx.tmp, start_new_session=True)  # fmt: skip
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its worker: the session started above
            proc.wait()
            raise CheckFailed(f"torchrun ran past {limit:.0f} s; log tail: {log.read_text()[-300:]!r}") from None
    seconds = time.perf_counter() - start
    tail = log.read_text()[-1500:]
    if rc != 0:
        raise CheckFailed(f"torchrun exited {rc}: {tail[-600:]!r}")
    weights = sorted(p.name for p in out.glob("*.safetensors"))
    if not (out / "config.json").is_file() or not weights:
        raise CheckFailed(f"exit 0 but no checkpoint in {out}: {tail[-400:]!r}")
    record = json.loads((out / "compactlm.json").read_text())["history"][-1]
    wrap = json.loads(info.read_text()) if info.is_file() else {}
    numbers = {"rc": rc, "seconds": seconds, "weights": weights, "world_size": record.get("world_size"),
               "steps": record.get("steps"), "tokens": record.get("tokens"), "wrap": wrap,
               "final_train_loss": record.get("final_train_loss"), "train": record.get("train")}  # fmt: skip
    sharded = "FSDP-sharded" if wrap.get("fsdp") else f"not FSDP-sharded at world size {wrap.get('world_size')}"
    text = (
        f"exit 0 in {seconds:.1f} s, {len(weights)} safetensors in the output, world_size {numbers['world_size']}, "
        f"{numbers['steps']} steps / {numbers['tokens']} tokens on {wrap.get('device', '?')}, final loss "
        f"{numbers['final_train_loss']:.4f}; model {wrap.get('wrapped', '?')} ({sharded})"
    )
    return text, numbers


def step_modelopt(ctx: Context) -> tuple[str, dict]:
    if importlib.util.find_spec("modelopt") is None:
        raise Skipped(f"modelopt is not importable ({os.environ.get('CHECK_WHEELS_STATUS') or 'no --wheels given'})")
    from compactlm.compress.quantize import quantize_model
    from compactlm.compress.unified import export_unified, load_unified, quiet

    try:
        with quiet():
            import modelopt.torch.export  # noqa: F401
            import modelopt.torch.quantization.extensions as ext
    except Exception as exc:  # a wheel without its dependencies, a version that does not fit this torch
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        raise Skipped(f"modelopt does not import: {reason} (wheels: {os.environ.get('CHECK_WHEELS_STATUS')})") from exc
    device, jit = ctx.device, ctx.args.modelopt_cuda_ext
    kernel = "torch eager float8_e4m3fn"
    if device.type == "cuda" and not jit:  # its first use compiles a CUDA extension (nvcc: minutes)
        ext.get_cuda_ext_fp8.extension = None
        kernel += " (--modelopt-cuda-ext: modelopt's kernel)"
    model = tiny_llama(ctx.size, seed=3, std=0.05).to(device)
    probe = tokens(3, 24, ctx.size["vocab_size"], seed=1)
    with torch.inference_mode():
        reference = model(input_ids=probe.to(device)).logits.float().cpu()
    start = time.perf_counter()
    info = quantize_model(model, "fp8", tokens(4, 32, ctx.size["vocab_size"], seed=3).split(2))
    ctx.sync()
    quant_s = time.perf_counter() - start
    if device.type == "cuda" and jit:
        built = getattr(ext.get_cuda_ext_fp8, "extension", None) is not None
        kernel = "modelopt CUDA extension" if built else kernel + " (the CUDA extension did not build)"
    with torch.inference_mode():
        fake = model(input_ids=probe.to(device)).logits.float().cpu()
    out = ctx.tmp / "fp8-unified"
    out.mkdir()
    quant = export_unified(model, out, "bfloat16")
    algo = json.loads((out / "hf_quant_config.json").read_text())["quantization"]["quant_algo"]
    back_model = load_unified(out, sorted(out.glob("*.safetensors")))
    with torch.inference_mode():
        back = back_model(input_ids=probe).logits.float()
    numbers = {"quant_algo": algo, "export": quant, "calibration_tokens": info["calibration_tokens"],
               "quantize_seconds": quant_s, "rel_fake_vs_fp32": rel(fake, reference),
               "rel_unified_vs_fake": rel(back, fake), "rel_unified_vs_fp32": rel(back, reference),
               "hooked_linears": back_model.compactlm_quantized_inputs, "fp8_kernel": kernel,
               "device": str(device), "files": sorted(p.name for p in out.iterdir())}  # fmt: skip
    text = (
        f"{device}: hf_quant_config.json quant_algo {algo}, {numbers['hooked_linears']} FP8 linears read back on "
        f"CPU; rel. logit error: fake-quant vs fp32 {numbers['rel_fake_vs_fp32']:.4f}, unified (CPU) vs "
        f"fake-quant {numbers['rel_unified_vs_fake']:.4f}, unified vs fp32 {numbers['rel_unified_vs_fp32']:.4f}; "
        f"calibrated {info['calibration_tokens']} tokens in {quant_s:.1f} s; kernel: {kernel}"
    )
    # Two FP8 roundings of nearly equal activations differ wherever a value crosses a rounding step, so the
    # read-back sits about one quantization error from the fake-quant model (0.5-0.9 of it measured on CPU), not
    # near 0: wrong scales give ~1, an unquantized read-back gives ~0 from fp32.
    error = numbers["rel_fake_vs_fp32"]
    ok = algo == "FP8" and bool(torch.isfinite(back).all()) and numbers["hooked_linears"] > 0
    ok = ok and 0.001 < error < 0.3 and numbers["rel_unified_vs_fake"] < 1.5 * error
    if not (ok and 0.3 * error < numbers["rel_unified_vs_fp32"] < 2 * error):
        raise CheckFailed("FP8 export does not match: " + text)
    return text, numbers


@contextlib.contextmanager
def time_limit(seconds: float):
    def expire(_signum, _frame):
        raise CheckFailed(f"ran past its {seconds:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_step(ctx: Context, name: str, limit: float) -> dict:
    funcs = {"torch-cuda-bf16": step_torch_bf16, "distill-step-bf16": step_distill, "modelopt-fp8-ptq": step_modelopt}
    captured, start, caught = io.StringIO(), time.perf_counter(), []
    result: dict = {"name": name, "limit_s": round(limit)}
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(captured):
            warnings.simplefilter("always")
            with contextlib.redirect_stderr(captured):
                if name == "fsdp-torchrun-1proc":
                    text, numbers = step_fsdp(ctx, limit)
                else:
                    with time_limit(limit):
                        text, numbers = funcs[name](ctx)
        result |= {"status": "PASS", "detail": text, "numbers": numbers}
    except Skipped as exc:
        result |= {"status": "SKIP", "detail": str(exc)}
    except Exception as exc:  # any failure is this step's, reported, never the whole run's
        reason = str(exc) if isinstance(exc, CheckFailed) else f"{type(exc).__name__}: {exc}"
        result |= {"status": "FAIL", "detail": " ".join(reason.split())[:900], "traceback": traceback.format_exc()}
    found = sorted({f"{w.category.__name__}: {str(w.message)[:200]}" for w in caught})
    seconds, output = round(time.perf_counter() - start, 2), captured.getvalue()[-2000:]
    return result | {"seconds": seconds, "warnings": found, "output": output}


def host_info(dry: bool) -> dict:
    from importlib import metadata

    info = {"python": sys.version.split()[0], "platform": platform.platform(), "hostname": platform.node(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "dry_run": dry, "wheels": os.environ.get("CHECK_WHEELS_STATUS", "none")}  # fmt: skip
    for dist in ("transformers", "nvidia-modelopt", "safetensors", "tokenizers", "typer", "rich"):
        found = next(iter(metadata.distributions(name=dist)), None)
        info[dist] = found.version if found else None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        major, minor = torch.cuda.get_device_capability(0)
        info |= {"device_name": props.name, "capability": f"{major}.{minor}", "device_count": torch.cuda.device_count(),
                 "device_memory_gib": round(props.total_memory / 2**30, 1)}  # fmt: skip
    return info


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def worker(argv: list[str]) -> None:
    """Under torchrun: the compactlm CLI (`python -m compactlm ARGS`), recording how the training loop wrapped
    the model (compress/train.py `_wrap`) into INFO."""
    info_path, cli_args = Path(argv[0]), argv[argv.index("--") + 1 :]
    import runpy

    from torch.distributed.fsdp import FSDPModule

    import compactlm.compress.train as training

    wrap, info = training._wrap, {}

    def recording_wrap(model, dist, cfg):
        wrapped = wrap(model, dist, cfg)
        sharded = isinstance(wrapped, FSDPModule)  # what fully_shard makes of a module
        info.update(world_size=dist.world_size, device=str(dist.device), parallel=cfg.parallel,
                    precision=cfg.precision, wrapped=type(wrapped).__name__, fsdp=sharded)  # fmt: skip
        info_path.write_text(json.dumps(info))
        return wrapped

    training._wrap = recording_wrap
    sys.argv = ["compactlm", *cli_args]
    runpy.run_module("compactlm", run_name="__main__", alter_sys=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="steps: " + ", ".join(STEPS))
    parser.add_argument("--dry-run", action="store_true", help="the same steps on CPU, smaller (no GPU needed)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "gpu" / "results", help="folder of the JSON")
    parser.add_argument("--only", default=",".join(STEPS), help="comma-separated steps to run (default: all)")
    parser.add_argument("--budget", type=float, default=450, help="seconds for all steps together (default 450)")
    parser.add_argument("--modelopt-cuda-ext", action="store_true", help="let modelopt JIT-build its FP8 kernel")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (models, logs)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    if unknown := sorted(set(names) - set(STEPS)):
        parser.error(f"unknown steps {unknown}; steps: {', '.join(STEPS)}")
    started = time.perf_counter()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"check-{stamp}.json"
    tmp = Path(tempfile.mkdtemp(prefix="compactlm-gpu-check-"))
    try:
        tree_on_path(tmp)
        for key, value in ("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"):
            os.environ.setdefault(key, value)
        warnings.filterwarnings("ignore")  # known library notices; each step records its own in the JSON
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        if args.dry_run:
            torch.set_num_threads(1)  # tiny models on a shared machine: threads only spin
        ctx = Context(args, tmp)
        import compactlm.compress

        host = host_info(args.dry_run)
        module = Path(compactlm.compress.__file__)
        host |= {"compactlm_from": str(module.resolve().parent.parent), "compactlm_module": str(module)}
        report = {"started": stamp, "host": host, "args": {k: str(v) for k, v in vars(args).items()}, "results": []}
        mode = " DRY-RUN (CPU)" if args.dry_run else ""
        print(f"gpu check{mode}: torch {host['torch']}, {host.get('device_name', 'no CUDA device')}"
              f" (capability {host.get('capability', '-')}), transformers {host['transformers']}, modelopt "
              f"{host['nvidia-modelopt']}, compactlm from {host['compactlm_from']}", flush=True)  # fmt: skip
        for name in names:
            left = args.budget - (time.perf_counter() - started)
            if left < 15:
                result = {"name": name, "status": "SKIP", "seconds": 0.0,
                          "detail": f"no time left in the {args.budget:.0f} s budget"}  # fmt: skip
            else:
                result = run_step(ctx, name, min(LIMITS[name], left - 5))
            report["results"].append(result)
            write_json(json_path, report)
            detail = f"{mode.strip()} {result['detail']}".strip()
            print(f"{result['status']} {name}: {detail} ({result['seconds']:.1f} s)", flush=True)
        counts = {s: sum(r["status"] == s for r in report["results"]) for s in ("PASS", "FAIL", "SKIP")}
        report |= {"counts": counts, "seconds": round(time.perf_counter() - started, 1)}
        write_json(json_path, report)
        print(f"SUMMARY{mode}: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP in "
              f"{report['seconds']:.1f} s -> {json_path}", flush=True)  # fmt: skip
        return 1 if counts["FAIL"] else 0
    finally:
        print(f"kept {tmp}") if args.keep else shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
