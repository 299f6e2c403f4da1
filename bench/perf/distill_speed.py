"""Distillation tokens/s on CPU, before and after, side by side in one run, with where a step's time goes.

The step is the job's: the student's forward, the KL to the teacher's cached top-k logits, backward, gradient
clipping and AdamW, on the same batch for every variant:
- before: fp32 and AdamW's default (for-each) step, as compactlm trained on CPU before;
- bf16 autocast alone;
- after: bf16 autocast and the fused AdamW step (train.py's CPU default where the CPU has bf16 units).
(A closed-form top-k KL with its gradient made in the forward, like `_ForwardKL`, measured slower than autograd's
log_softmax + gather here: 1.86 s vs 1.57 s of forward + backward, so `kd_topk` stays as it is.)
Variants run interleaved so that drift of the machine hits them alike; the median is reported with the peak RSS
each variant reached above the process's RSS before it. bf16 pays only on CPUs with native bf16 matrix units
(AVX512-BF16, AMX): the CPU's flags are printed, and on a CPU without them training keeps fp32 (train.py).

    python -m compactlm.bench.perf.distill_speed [--student runs/smollm2-minitron-small/models/width-pruned] \
        [--batch-size 4] [--seq-len 256] [--steps 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import threading
import time

import torch

from compactlm.bench.perf.timing import interleaved


class _Cache:
    """The teacher's top-k logits of the one batch, as a TeacherCache would return them."""

    def __init__(self, values, indices):
        self.values, self.indices = values, indices

    def lookup(self, rows):
        return self.values, self.indices


class _PeakRSS:
    """Samples the process's RSS every 5 ms while open; `peak` is the highest above its value at entry."""

    def __enter__(self):
        import psutil

        self._proc, self._stop = psutil.Process(), threading.Event()
        self.start = self.peak_rss = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> int:
        return self.peak_rss - self.start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--student", default="runs/smollm2-minitron-small/models/width-pruned")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from compactlm.compress.checkpoint import load_model, load_tokenizer
    from compactlm.compress.data import load_sequences
    from compactlm.compress.distill import Distillation
    from compactlm.compress.train import Batch
    from compactlm.compress.train_config import DistillConfig
    from compactlm.core.host import cpu_bf16, cpu_model

    tokens = load_sequences(
        "python-docs", load_tokenizer(args.teacher), num_sequences=args.batch_size, seq_len=args.seq_len
    )
    teacher = load_model(args.teacher)
    with torch.inference_mode():
        top = teacher(input_ids=tokens, use_cache=False).logits.topk(args.top_k, dim=-1)
    cache = _Cache(top.values.clone(), top.indices.clone())
    del teacher, top
    batch = Batch(indices=torch.arange(args.batch_size), input_ids=tokens)
    kd = Distillation(DistillConfig(loss="logit"), "logit", cache=cache)
    variants = {  # name: (bf16 autocast, loss, fused AdamW)
        "before (fp32)": (False, kd.loss, False),
        "bf16 autocast": (True, kd.loss, False),
        "after": (True, kd.loss, True),
    }
    students = {name: load_model(args.student).train() for name in variants}
    optimizers = {
        name: torch.optim.AdamW(m.parameters(), lr=1e-6, fused=variants[name][2]) for name, m in students.items()
    }
    phases: dict[str, dict[str, list[float]]] = {name: {} for name in students}
    losses: dict[str, list[float]] = {name: [] for name in students}
    peaks: dict[str, int] = dict.fromkeys(students, 0)

    def steps(name: str) -> None:
        model, optimizer = students[name], optimizers[name]
        bf16, objective, _ = variants[name]
        cast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with _PeakRSS() as rss:
            for _ in range(args.steps):
                marks = [time.perf_counter()]
                optimizer.zero_grad(set_to_none=True)
                with cast:
                    loss, _ = objective(model, batch)
                marks.append(time.perf_counter())
                loss.backward()
                marks.append(time.perf_counter())
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                marks.append(time.perf_counter())
                spans = zip(marks, marks[1:], strict=False)
                for phase, (a, b) in zip(("forward + loss", "backward", "clip + AdamW"), spans, strict=True):
                    phases[name].setdefault(phase, []).append(b - a)
                losses[name].append(loss.item())
        peaks[name] = max(peaks[name], rss.peak)

    runs = {name: (lambda name=name: steps(name)) for name in students}
    for fn in runs.values():  # warm-up: first-call allocations, oneDNN kernel selection
        fn()
    for name in students:
        phases[name].clear()
        losses[name].clear()
    times = interleaved(runs, args.repeats)

    n = args.steps * tokens.numel()
    print(
        f"\nstudent {args.student} (from {args.teacher}), {args.batch_size} x {args.seq_len} tokens a step, "
        f"top-{args.top_k} cached logits; {args.steps} steps x {args.repeats} interleaved repeats (median); "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; CPU {cpu_model()}, "
        f"native bf16: {cpu_bf16() or 'none'}"
    )
    print(f"{'variant':16s} {'tokens/s':>9s} {'forward+loss':>13s} {'backward':>9s} {'AdamW':>7s} {'peak MB':>8s}")
    base = None
    for name in students:
        speed = n / statistics.median(times[name])
        base = base or speed
        med = {p: 1000 * statistics.median(v) for p, v in phases[name].items()}
        print(
            f"{name:16s} {speed:9.0f} {med['forward + loss']:10.0f} ms {med['backward']:6.0f} ms "
            f"{med['clip + AdamW']:4.0f} ms {peaks[name] / 2**20:8.0f}"
        )
    print()
    for name in list(variants)[1:]:
        drift = max(abs(a - b) for a, b in zip(losses["before (fp32)"], losses[name], strict=True))
        print(
            f"{name}: {n / statistics.median(times[name]) / base:.2f}x the tokens/s of before; loss on the same batch "
            f"{losses[name][0]:.4f} vs {losses['before (fp32)'][0]:.4f} (max |difference| over the steps {drift:.4f})"
        )


if __name__ == "__main__":
    main()
