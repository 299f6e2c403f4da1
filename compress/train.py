"""The one training loop: distillation, teacher correction, CE training and the architecture search use it.

AdamW; linear warm-up then cosine decay to a minimum LR (the paper: 1e-4 -> 1e-5, 40 warm-up steps, scaled
to short runs); gradient accumulation; clipping; optional bf16 autocast; rich progress with loss, tokens/s and
ETA. Checkpoints (model, objective's own modules, optimizer, scheduler, data position, RNG) go to a work
folder every `save_every` steps and on SIGINT/SIGTERM; `resume=True` continues exactly. A non-finite loss
stops the run and keeps the last good checkpoint. Under `torchrun` it runs data-parallel (DDP; FSDP on GPUs),
and a run on N processes equals one process with the same global batch.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import random
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from compactlm.compress.train_config import TrainConfig
from compactlm.core.errors import CompactLMError


@dataclass
class Batch:
    indices: torch.Tensor
    """Row numbers of the sequences in the training set (a teacher cache is looked up by them)."""
    input_ids: torch.Tensor


class Objective(Protocol):
    """What the loop minimizes. `modules()` are trained along with the model (e.g. hidden-state maps)."""

    name: str

    def modules(self) -> list[nn.Module]: ...

    def loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]: ...


class CrossEntropy:
    """Next-token CE on the labels: conventional training and teacher correction."""

    name = "ce"

    def modules(self) -> list[nn.Module]:
        return []

    def loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        from compactlm.compress.losses import cross_entropy

        loss = cross_entropy(model(input_ids=batch.input_ids, use_cache=False).logits, batch.input_ids)
        return loss, {"ce": loss.item()}


class TrainingData:
    """Packed training sequences, visited in a seeded random order, one epoch after another.

    The position in the data is the optimizer step: the micro-batch for (step, micro, rank) is a pure function
    of them, which makes resuming exact and makes N processes see what one process would with N-fold
    accumulation.
    """

    def __init__(self, sequences: torch.Tensor, seed: int = 0):
        if sequences.ndim != 2 or len(sequences) == 0:
            raise CompactLMError("the training data is empty")
        self.sequences, self.seed = sequences, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.sequences), generator=gen)}
        return self._perms[epoch]

    def micro_batch(self, step: int, micro: int, rank: int, cfg: TrainConfig, world_size: int) -> Batch:
        start = step * cfg.global_batch(world_size) + (micro * world_size + rank) * cfg.batch_size
        positions = range(start, start + cfg.batch_size)
        n = len(self.sequences)
        indices = torch.stack([self._order(p // n)[p % n] for p in positions])
        return Batch(indices=indices, input_ids=self.sequences[indices])


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    """One row per optimizer step: step, loss, lr, tokens, seconds and the objective's parts."""

    @property
    def final_loss(self) -> float:
        return self.history[-1]["loss"] if self.history else math.nan


class TrainingInterrupted(CompactLMError):
    """SIGINT/SIGTERM: a checkpoint was saved; the same command with --resume continues."""


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def distributed_from_env() -> Distributed:
    """Join the process group torchrun set up (gloo on CPU, NCCL on GPU); a plain run is world size 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        # Leave the group before the interpreter tears down: a gloo group destroyed by static destructors at
        # exit can abort the process ("terminate called without an active exception") after its work is done.
        atexit.register(_leave_process_group)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    return Distributed(dist.get_rank(), world, torch.device(f"cuda:{local}" if cuda else "cpu"))


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def lr_lambda(cfg: TrainConfig, total: int):
    warmup = cfg.warmup(total)
    floor = cfg.min_lr / cfg.lr

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[dict]:
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step (only in the main thread)."""
    flag = {"signal": None}
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, _frame):
        flag["signal"] = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _wrap(model, dist: Distributed, cfg: TrainConfig):
    if dist.world_size == 1:
        return model
    if cfg.parallel == "fsdp":
        if dist.device.type != "cuda":
            raise CompactLMError("--parallel fsdp needs CUDA GPUs; on CPU use ddp")
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model)


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """`auto` is bf16 on CUDA and on CPUs with native bf16 matrix units (AMX, AVX512-BF16), fp32 elsewhere: on
    AMX, bf16 autocast trained the job's width student 1.56x faster than fp32 at half the memory, its loss within
    0.02 nats on the same batch (bench/perf/distill_speed.py); without those units bf16 is emulated and slower."""
    if cfg.precision != "auto":
        return cfg.precision == "bf16"
    if device.type == "cuda":
        return True
    from compactlm.core.host import cpu_bf16

    return device.type == "cpu" and cpu_bf16() is not None


def precision_used(cfg: TrainConfig) -> str:
    """ "bf16" or "fp32": what a run of `cfg` trains in on this machine (for records)."""
    return "bf16" if uses_bf16(cfg, distributed_from_env().device) else "fp32"


def _autocast(cfg: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if uses_bf16(cfg, device) else contextlib.nullcontext()


def train(
    model: nn.Module,
    objective: Objective,
    data: TrainingData,
    cfg: TrainConfig,
    work_dir: str | os.PathLike,
    *,
    resume: bool = False,
    description: str = "train",
    stop_after: int | None = None,
) -> TrainResult:
    """Train `model` on `data` to minimize `objective`; checkpoints go to `work_dir/checkpoints`.

    `stop_after` simulates an interruption after that many steps of this call (for tests): it saves and raises
    TrainingInterrupted exactly as a signal would.
    """
    dist = distributed_from_env()
    work_dir = Path(work_dir)
    seq_len = data.sequences.shape[1]
    total = cfg.total_steps(seq_len, dist.world_size)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model.to(dist.device).train()
    wrapped = _wrap(model, dist, cfg)  # before the optimizer: FSDP replaces the parameters with sharded ones
    sharded = dist.world_size > 1 and cfg.parallel == "fsdp"  # no mid-run checkpoints under FSDP (yet)
    extras = nn.ModuleList(objective.modules()).to(dist.device)
    params = [p for p in list(model.parameters()) + list(extras.parameters()) if p.requires_grad]
    # fused: one kernel over all parameters (CPU too: 86 vs 230 ms a step for the job's 66M-parameter student)
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95), fused=dist.device.type in ("cuda", "cpu")
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total))
    history: list[dict] = []
    start_step, elapsed = 0, 0.0
    if resume:
        state = load_training_state(work_dir, model, extras, optimizer, scheduler, cfg)
        if state is not None:
            start_step, history, elapsed = state["step"], state["history"], state["seconds"]
    tokens_per_step = cfg.global_batch(dist.world_size) * seq_len

    progress = _progress(description, total, start_step) if dist.main else contextlib.nullcontext(None)
    started = time.perf_counter() - elapsed
    with _stop_on_signals() as stop, progress as bar:
        for step in range(start_step, total):
            optimizer.zero_grad(set_to_none=True)
            loss_sum, parts_sum = 0.0, {}
            for micro in range(cfg.grad_accum):
                batch = data.micro_batch(step, micro, dist.rank, cfg, dist.world_size)
                batch = Batch(batch.indices, batch.input_ids.to(dist.device))
                sync = micro == cfg.grad_accum - 1 or not hasattr(wrapped, "no_sync")
                try:
                    with contextlib.nullcontext() if sync else wrapped.no_sync(), _autocast(cfg, dist.device):
                        loss, parts = objective.loss(wrapped, batch)
                except (torch.OutOfMemoryError, RuntimeError) as exc:
                    if not _is_oom(exc):
                        raise
                    raise CompactLMError(
                        f"out of memory at step {step + 1} ({cfg.batch_size} x {seq_len} tokens per micro-batch): "
                        "lower --batch-size (and raise --grad-accum to keep the global batch), lower --seq-len, "
                        "or distill from a teacher cache (--teacher-cache) to keep the teacher out of memory"
                    ) from exc
                if not torch.isfinite(loss):
                    saved = _checkpoints(work_dir)
                    raise CompactLMError(
                        f"the loss became {loss.item()} at step {step + 1}: training stopped. "
                        + (
                            f"The last good checkpoint is kept in {saved[-1]}. "
                            if saved
                            else "No checkpoint was saved. "
                        )
                        + "Try a lower --lr (or fp32 precision)."
                    )
                (loss / cfg.grad_accum).backward()
                loss_sum += loss.item()
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v
            _all_reduce_grads(extras, dist)  # DDP syncs the model's gradients, not the objective's own modules'
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]  # the lr this step trained with
            optimizer.step()
            scheduler.step()
            row = {
                "step": step + 1,
                "loss": _mean_over_ranks(loss_sum / cfg.grad_accum, dist),
                "lr": lr,
                "tokens": (step + 1) * tokens_per_step,
                "seconds": time.perf_counter() - started,
            }
            row |= {k: _mean_over_ranks(v / cfg.grad_accum, dist) for k, v in parts_sum.items()}
            history.append(row)
            if bar is not None:
                bar(row, total)
            interrupted = stop["signal"] or (stop_after is not None and step + 1 - start_step >= stop_after)
            periodic = cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total
            if (interrupted or periodic) and not sharded:
                save_training_state(work_dir, model, extras, optimizer, scheduler, cfg, history, dist)
            if interrupted:
                raise TrainingInterrupted(
                    f"interrupted ({stop['signal'] or 'stop_after'}) after step {step + 1} of {total}: "
                    f"checkpoint saved in {work_dir / 'checkpoints'}; run the same command with --resume to continue"
                )
    model.eval()
    return TrainResult(
        steps=total, tokens=total * tokens_per_step, seconds=time.perf_counter() - started, history=history
    )


def gather_full_model(model, cfg: TrainConfig):
    """The whole model on rank 0 after FSDP training (a collective: every rank calls it); others get None."""
    dist = distributed_from_env()
    if not (dist.world_size > 1 and cfg.parallel == "fsdp"):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.main:
        return None
    full = AutoModelForCausalLM.from_config(model.config)
    full.load_state_dict(state)
    return full.eval()


def _is_oom(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def _all_reduce_grads(module: nn.Module, dist: Distributed) -> None:
    if dist.world_size == 1:
        return
    import torch.distributed as tdist

    for p in module.parameters():
        if p.grad is not None:
            tdist.all_reduce(p.grad)
            p.grad /= dist.world_size


def _mean_over_ranks(value: float, dist: Distributed) -> float:
    if dist.world_size == 1:
        return value
    import torch.distributed as tdist

    tensor = torch.tensor([value], dtype=torch.float64, device=dist.device)
    tdist.all_reduce(tensor)
    return tensor.item() / dist.world_size


@contextlib.contextmanager
def _progress(description: str, total: int, start: int):
    from compactlm.core.console import progress_bar

    with progress_bar("loss {task.fields[loss]}", "{task.fields[speed]} tok/s") as progress:
        task = progress.add_task(description, total=total, completed=start, loss="-", speed="-")
        last = {"t": time.perf_counter(), "tokens": None}

        def update(row: dict, total: int) -> None:
            now = time.perf_counter()
            speed = "-"
            if last["tokens"] is not None:
                speed = f"{(row['tokens'] - last['tokens']) / max(now - last['t'], 1e-9):,.0f}"
            last.update(t=now, tokens=row["tokens"])
            progress.update(task, completed=row["step"], loss=f"{row['loss']:.4f}", speed=speed)

        yield update


# --- checkpoints ------------------------------------------------------------------------------------------------

KEEP_CHECKPOINTS = 2


def _checkpoints(work_dir: Path) -> list[Path]:
    folder = work_dir / "checkpoints"
    return sorted(folder.glob("step-*")) if folder.is_dir() else []


def _config_key(cfg: TrainConfig) -> dict:
    """The settings a resumed run must share with the interrupted one."""
    keep = (
        "steps",
        "tokens",
        "seq_len",
        "batch_size",
        "grad_accum",
        "lr",
        "min_lr",
        "warmup_steps",
        "weight_decay",
        "seed",
    )
    return {k: v for k, v in asdict(cfg).items() if k in keep}


def save_training_state(work_dir: Path, model, extras, optimizer, scheduler, cfg, history, dist: Distributed) -> None:
    """Write a resumable checkpoint atomically (rank 0 only); keep the last two."""
    if not dist.main:
        return
    from safetensors.torch import save_model

    step = history[-1]["step"]
    folder = work_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".step-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    save_model(extras, str(tmp / "extras.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
    state = {
        "step": step,
        "config": _config_key(cfg),
        "scheduler": scheduler.state_dict(),
        "python_rng": random.getstate(),
        "history": history,
        "seconds": history[-1]["seconds"],
    }
    (tmp / "state.json").write_text(json.dumps(state))
    final = folder / f"step-{step:07d}"
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in _checkpoints(work_dir)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)


def load_training_state(work_dir: Path, model, extras, optimizer, scheduler, cfg) -> dict | None:
    """Restore the newest checkpoint into the given objects; None when there is none."""
    from safetensors.torch import load_model

    checkpoints = _checkpoints(work_dir)
    if not checkpoints:
        return None
    latest = checkpoints[-1]
    state = json.loads((latest / "state.json").read_text())
    if state["config"] != _config_key(cfg):
        changed = {k for k in state["config"] if state["config"][k] != _config_key(cfg).get(k)}
        raise CompactLMError(
            f"cannot resume from {latest}: it was made with other settings ({', '.join(sorted(changed))}); "
            "run with the same settings, or without --resume and with --overwrite to start over"
        )
    load_model(model, str(latest / "model.safetensors"))
    load_model(extras, str(latest / "extras.safetensors"))
    optimizer.load_state_dict(torch.load(latest / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(torch.load(latest / "rng.pt", weights_only=True)["torch"])
    python_rng = state["python_rng"]
    random.setstate((python_rng[0], tuple(python_rng[1]), python_rng[2]))
    return state
