"""Expert importance vs random experts (issue 20): on a tiny mixture of experts trained briefly on the bundled text so
that its experts differ, prune the routed experts (and, separately, each expert's FFN neurons) by each importance
metric and by random scores with several seeds, and compare the held-out loss of the pruned models, no retraining.

The setup (stated in the report it writes): the SmolLM2 tokenizer's ids remapped to the `--vocab` - 1 most frequent
ids of the training rows plus one id for the rest (a 49,152-row LM head would take most of the compute of so small a
model); a model from the real transformers config class (`--family`), trained from random with AdamW and the
router's load-balancing loss on python-docs' train split; importance on `--calib` training rows; the held-out loss on
python-docs' held-out split. The trained model is kept under `--work` and reused by a rerun.

    python -m compactlm.bench.perf.moe_experts [--family mixtral] [--steps 400] [--out docs/compress/moe]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import pandas as pd
import torch

SHAPE = dict(
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=256,
    tie_word_embeddings=True,
    num_experts_per_tok=2,
    router_aux_loss_coef=0.02,
)
EXPERTS = {"mixtral": {"num_local_experts": 8, "intermediate_size": 256}}
EXPERTS["qwen3_moe"] = {
    "num_experts": 8,
    "moe_intermediate_size": 256,
    "intermediate_size": 256,
    "norm_topk_prob": True,
}
EXPERTS["qwen2_moe"] = {
    "num_experts": 8,
    "moe_intermediate_size": 256,
    "shared_expert_intermediate_size": 256,
    "intermediate_size": 256,
}


def _config(family: str, vocab: int):
    from transformers import AutoConfig

    return AutoConfig.for_model(family, vocab_size=vocab, **SHAPE, **EXPERTS[family])


def _remap(train: torch.Tensor, vocab: int) -> torch.Tensor:
    """Old id -> new id: the vocab - 1 most frequent ids of the training rows keep an id each, the rest share id 0."""
    counts = torch.bincount(train.reshape(-1), minlength=int(train.max()) + 1)
    top = torch.argsort(counts, descending=True)[: vocab - 1]
    table = torch.zeros(max(len(counts), 1 << 16), dtype=torch.long)
    table[top] = torch.arange(1, vocab)
    return table


def _data(args):
    from compactlm.compress.checkpoint import load_tokenizer
    from compactlm.compress.data import load_sequences

    tokenizer = load_tokenizer("smollm2-135m")
    rows = args.steps * args.batch_size
    train = load_sequences("python-docs", tokenizer, num_sequences=rows, seq_len=args.seq_len, split="train")
    heldout = load_sequences(
        "python-docs", tokenizer, num_sequences=args.heldout, seq_len=args.seq_len, split="heldout", allow_fewer=True
    )
    table = _remap(train, args.vocab)
    covered = (table[train] != 0).float().mean().item()
    return table[train], table[heldout], covered


def _train(config, train: torch.Tensor, args, work: Path):
    """AdamW, cosine from lr to lr/10 after 20 warm-up steps, LM loss + the router's load-balancing loss."""
    from transformers import AutoModelForCausalLM

    if (work / "config.json").exists():
        print(f"reusing the trained model in {work}")
        return AutoModelForCausalLM.from_pretrained(work, dtype=torch.float32).eval(), json.loads(
            (work / "training.json").read_text()
        )
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = 20

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    started, log = time.perf_counter(), []
    model.train()
    for step in range(args.steps):
        batch = train[step * args.batch_size : (step + 1) * args.batch_size]
        out = model(input_ids=batch, labels=batch, output_router_logits=True, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            aux = out.aux_loss.item() if getattr(out, "aux_loss", None) is not None else float("nan")
            log.append({"step": step, "loss": round(out.loss.item(), 4), "aux_loss": round(aux, 4)})
            print(f"step {step:4d}  loss {out.loss.item():.3f}  aux {aux:.3f}  {time.perf_counter() - started:.0f} s")
    model.eval()
    info = {"seconds": round(time.perf_counter() - started, 1), "log": log}
    work.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(work)
    (work / "training.json").write_text(json.dumps(info, indent=1))
    return model, info


def _loss(model, rows: torch.Tensor) -> float:
    from compactlm.compress.depth import lm_loss

    return lm_loss(model, rows, batch_size=16)


def main() -> None:
    from compactlm.compress.arch import moe_layer_indices, shape_of
    from compactlm.compress.importance import EXPERT_METRICS, ImportanceConfig, estimate_importance, random_scores
    from compactlm.compress.prune import PruneTarget, prune

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="mixtral", choices=sorted(EXPERTS))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--calib", type=int, default=64, help="training rows importance is estimated on")
    parser.add_argument("--heldout", type=int, default=128, help="held-out rows the loss is measured on")
    parser.add_argument("--seeds", type=int, default=10, help="random-expert baselines")
    parser.add_argument("--experts", default="6,4,2", help="expert counts to prune to")
    parser.add_argument("--ffn", default="128,64", help="expert FFN widths to prune to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--work", type=Path, default=None, help="where the trained model is kept (runs/moe-experts/FAMILY)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/moe-experts"))
    args = parser.parse_args()
    work = args.work or Path("runs/moe-experts") / args.family
    torch.set_num_threads(max(1, torch.get_num_threads()))

    train, heldout, covered = _data(args)
    print(f"{len(train)} training rows, {len(heldout)} held-out rows of {args.seq_len} tokens; "
          f"the top {args.vocab - 1} ids cover {covered:.1%} of the training tokens")  # fmt: skip
    model, info = _train(_config(args.family, args.vocab), train, args, work)
    calib = train[: args.calib]
    started = time.perf_counter()
    scores = estimate_importance(model, calib, ImportanceConfig(removal_loss=False, batch_size=16))
    importance_s = time.perf_counter() - started
    base = _loss(model, heldout)
    moe = moe_layer_indices(model.config)
    usage = scores.experts["frequency"][list(moe)]
    print(f"held-out loss {base:.4f}; routing share per expert, layer by layer:\n{(usage / 2).numpy().round(3)}")

    rows = []

    def measure(axis: str, size: int, method: str, seed, target, by) -> None:
        student, _, _ = prune(model, by, target)
        loss = _loss(student, heldout)
        rows.append({"axis": axis, "size": size, "method": method, "seed": seed, "heldout_loss": round(loss, 4)})

    sizes = {
        "experts": [int(x) for x in args.experts.split(",") if x],
        "ffn": [int(x) for x in args.ffn.split(",") if x],
    }
    for size in sizes["experts"]:
        for metric in EXPERT_METRICS:
            measure("experts", size, metric, None, PruneTarget(num_experts=size, expert_metric=metric), scores)
        for seed in range(args.seeds):
            measure("experts", size, "random", seed, PruneTarget(num_experts=size), random_scores(model.config, seed))
        print(f"experts {size}: done")
    for size in sizes["ffn"]:
        measure("ffn", size, "activation", None, PruneTarget(moe_ffn_hidden_size=size), scores)
        for seed in range(args.seeds):
            target = PruneTarget(moe_ffn_hidden_size=size)
            measure("ffn", size, "random", seed, target, random_scores(model.config, seed))
        print(f"expert FFN {size}: done")

    frame = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out / f"results-{args.family}.csv", index=False)
    setup = {
        "family": args.family,
        "shape": shape_of(model.config).as_dict(),
        "steps": args.steps,
        "batch": f"{args.batch_size} x {args.seq_len}",
        "training_tokens": int(train.numel()),
        "training_seconds": info["seconds"],
        "training_log": info["log"],
        "vocab": args.vocab,
        "vocab_coverage": round(covered, 4),
        "calibration_rows": args.calib,
        "heldout_rows": len(heldout),
        "importance_seconds": round(importance_s, 1),
        "heldout_loss": round(base, 4),
        "routing_share": (usage / 2).numpy().round(4).tolist(),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }
    (args.out / f"setup-{args.family}.json").write_text(json.dumps(setup, indent=1))
    (args.out / f"table-{args.family}.md").write_text(_table(frame, base))
    print(_table(frame, base))


def _table(frame: pd.DataFrame, base: float) -> str:
    """One line per (axis, size): each importance metric's held-out loss, and random's mean, range and how many of
    its seeds beat the best metric."""
    lines = [
        f"Unpruned held-out loss: {base:.3f}.",
        "",
        "| cut | by importance | random (mean, min-max over seeds) | random seeds that beat the default metric |",
        "|---|---|---|---|",
    ]
    for (axis, size), group in frame.groupby(["axis", "size"], sort=False):
        measured = group[group.method != "random"]
        random = group[group.method == "random"].heldout_loss.tolist()
        default = measured.iloc[0]
        cells = ", ".join(f"{m} {v:.3f}" for m, v in zip(measured.method, measured.heldout_loss, strict=True))
        spread = f"{statistics.mean(random):.3f} ({min(random):.3f}-{max(random):.3f})"
        beat = sum(r < default.heldout_loss for r in random)
        what = f"{size} experts of 8" if axis == "experts" else f"expert FFN {size} of 256"
        lines.append(f"| {what} | {cells} | {spread} | {beat} of {len(random)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
