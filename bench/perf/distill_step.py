"""One distillation step vs its parts: a bare student training step plus one teacher forward, side by side.

Target (issue: compression core part 2): a distillation step costs at most 15% more than a bare student
training step (CE: forward, backward, AdamW) plus one teacher forward (inference) on the same tokens. The
overhead is what distillation adds on top: the KL over the full vocabulary, hidden-state hooks and losses.
Runs are interleaved and the median of the repeats is reported.

    python -m compactlm.bench.perf.distill_step [--student runs/demo/depth] [--loss logit] [--batch-size 4] \
        [--seq-len 256]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from compactlm.bench.perf.timing import interleaved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--student", default="runs/demo/depth", help="a student pruned from the teacher (make demo)")
    parser.add_argument("--loss", default="logit", help="logit | logit+hidden | logit+hidden+embedding")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from compactlm.compress.checkpoint import load_model, load_tokenizer
    from compactlm.compress.data import load_sequences
    from compactlm.compress.distill import Distillation, lineage
    from compactlm.compress.train import Batch, CrossEntropy
    from compactlm.compress.train_config import DistillConfig

    teacher, student = load_model(args.teacher), load_model(args.student)
    teacher.requires_grad_(False)
    tokens = load_sequences(
        "python-docs", load_tokenizer(args.teacher), num_sequences=args.batch_size, seq_len=args.seq_len
    )
    batch = Batch(indices=torch.arange(args.batch_size), input_ids=tokens)
    mapping = lineage(student.compactlm_path, teacher.config, student.config) if "hidden" in args.loss else None
    kd = Distillation(
        DistillConfig(loss=args.loss),
        args.loss,
        teacher=teacher,
        lineage=mapping,
        student_width=student.config.hidden_size,
        teacher_width=teacher.config.hidden_size,
    )
    ce = CrossEntropy()
    params = list(student.parameters()) + [p for m in kd.modules() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-6)  # tiny lr: the weights barely move between repeats
    student.train()

    def step(objective) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = objective.loss(student, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    @torch.inference_mode()
    def teacher_forward() -> None:
        teacher(input_ids=tokens, use_cache=False)

    runs = {
        "student train step (CE)": lambda: step(ce),
        "teacher forward": teacher_forward,
        f"distillation step ({args.loss})": lambda: step(kd),
    }
    for fn in runs.values():  # warm-up
        fn()
    times = interleaved(runs, args.repeats)

    med = {name: statistics.median(v) for name, v in times.items()}
    parts = med["student train step (CE)"] + med["teacher forward"]
    n = tokens.numel()
    print(
        f"\nteacher {args.teacher}, student {args.student}, {args.batch_size} x {args.seq_len} tokens, "
        f"median of {args.repeats} interleaved repeats, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'run':42s} {'median s':>9s} {'tokens/s':>9s}")
    for name, value in med.items():
        print(f"{name:42s} {value:9.3f} {n / value:9.0f}")
    print(f"{'student step + teacher forward (sum)':42s} {parts:9.3f} {n / parts:9.0f}")
    overhead = med[f"distillation step ({args.loss})"] / parts - 1
    verdict = "meets" if overhead <= 0.15 else "MISSES"
    print(f"\ndistillation overhead over its parts: {100 * overhead:+.1f}% ({verdict} the <= 15% target)")


if __name__ == "__main__":
    main()
