"""`compactlm compress ...`: importance, pruning, evaluation; retraining, search, quantization and chains are
registered from their own modules."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from compactlm.cli import chain, generate, quantize, search, train
from compactlm.cli.options import BatchOpt, DataOpt, ModelArg, OverwriteOpt, SamplesOpt, SeqLenOpt
from compactlm.core.console import console
from compactlm.core.errors import CompactLMError

TaskSamplesOpt = Annotated[
    int,
    typer.Option(
        help="Examples of a depth task (its last, in a fixed order; evaluation takes its first): task:NAME only."
    ),
]

app = typer.Typer(help="Compression: importance estimation, pruning, evaluation.", no_args_is_help=True)


def _parse_sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise CompactLMError(f"--block-sizes must be a comma-separated list of integers, not {text!r}") from exc


@app.command("importance")
def importance_cmd(
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="Where to write the scores (.safetensors, metadata inside).")],
    data: DataOpt = "python-docs",
    samples: SamplesOpt = 128,
    seq_len: SeqLenOpt = 256,
    batch_size: BatchOpt = 8,
    seq_agg: Annotated[str, typer.Option(help="Reduction over tokens: mean, l2 or var.")] = "mean",
    batch_agg: Annotated[str, typer.Option(help="Reduction over samples: mean, l2 or var.")] = "l2",
    block_sizes: Annotated[
        str,
        typer.Option(help="Contiguous block sizes scored by removal loss and Block Influence, e.g. 1,14."),
    ] = "1",
    depth_samples: Annotated[int, typer.Option(help="Sequences used for the layer-removal losses.")] = 8,
    removal_loss: Annotated[
        bool, typer.Option(help="Compute layer-removal LM losses (one forward per candidate block).")
    ] = True,
    depth_task: Annotated[
        str | None,
        typer.Option(
            help="Also score each candidate block by the accuracy on these bundled multiple-choice tasks without it "
            "(comma-separated, e.g. winowhy): what `prune --depth-metric task:NAME` chooses by."
        ),
    ] = None,
    task_samples: TaskSamplesOpt = 128,
    overwrite: OverwriteOpt = False,
) -> None:
    """Score MLP neurons, attention heads, embedding channels and layers with forward passes only."""
    from compactlm.compress.checkpoint import inspect_checkpoint
    from compactlm.compress.data import check_data
    from compactlm.compress.importance import ImportanceConfig
    from compactlm.compress.operations import run_importance
    from compactlm.compress.tables import blocks_table, depth_table, experts_table
    from compactlm.core.io import check_output

    config = ImportanceConfig(
        seq_agg=seq_agg,
        batch_agg=batch_agg,
        batch_size=batch_size,
        depth_samples=depth_samples,
        block_sizes=_parse_sizes(block_sizes),
        removal_loss=removal_loss,
        depth_tasks=tuple(t.strip() for t in (depth_task or "").split(",") if t.strip()),
        task_samples=task_samples,
    )
    check_output(out, overwrite)
    checkpoint = inspect_checkpoint(model)
    checkpoint.check_length(seq_len, "--seq-len")
    path = checkpoint.path
    check_data(data)
    scores = run_importance(path, data, samples, seq_len, config)
    scores.save(out)
    for table in (depth_table(scores), blocks_table(scores), experts_table(scores)):
        if table is not None:
            console.print(table)
    console.print(f"scores written to [bold]{out}[/] ({scores.meta['seconds']} s)")


@app.command("prune")
def prune_cmd(
    model: ModelArg,
    out: Annotated[Path, typer.Argument(help="Output checkpoint directory (written atomically).")],
    hidden_size: Annotated[int | None, typer.Option(help="New hidden (embedding) size.")] = None,
    ffn_hidden_size: Annotated[int | None, typer.Option(help="New MLP intermediate size.")] = None,
    num_attention_heads: Annotated[int | None, typer.Option(help="New number of query heads.")] = None,
    num_query_groups: Annotated[int | None, typer.Option(help="New number of KV groups (GQA).")] = None,
    num_layers: Annotated[int | None, typer.Option(help="Keep this many layers.")] = None,
    drop_layers: Annotated[str | None, typer.Option(help="Drop these layers, e.g. 16-29 or 3,5,10-12.")] = None,
    depth_metric: Annotated[
        str,
        typer.Option(
            help="How --num-layers picks layers: block-loss, layer-loss, block-influence, or task:NAME (the block "
            "whose removal keeps the accuracy on bundled task NAME highest, e.g. task:winowhy)."
        ),
    ] = "block-loss",
    num_experts: Annotated[
        int | None, typer.Option(help="Mixture of experts: keep this many routed experts in each MoE layer.")
    ] = None,
    moe_ffn_hidden_size: Annotated[
        int | None, typer.Option(help="Mixture of experts: new FFN width of every routed expert.")
    ] = None,
    shared_expert_ffn_hidden_size: Annotated[
        int | None, typer.Option(help="Mixture of experts: new FFN width of the shared expert (Qwen2-MoE).")
    ] = None,
    expert_metric: Annotated[
        str,
        typer.Option(
            help="How --num-experts ranks experts: contribution (routing weight x output norm per token), "
            "router_prob, frequency or reap."
        ),
    ] = "contribution",
    scores: Annotated[
        Path | None, typer.Option(help="Importance scores from `compress importance` (else computed now).")
    ] = None,
    random_seed: Annotated[
        int | None,
        typer.Option(help="Prune by random scores with this seed: the baseline importance must beat."),
    ] = None,
    data: DataOpt = "python-docs",
    samples: SamplesOpt = 128,
    seq_len: SeqLenOpt = 256,
    batch_size: BatchOpt = 8,
    task_samples: TaskSamplesOpt = 128,
    overwrite: OverwriteOpt = False,
) -> None:
    """Prune a model uniformly across layers to the given sizes; write a standard HF checkpoint."""
    from compactlm.compress.checkpoint import inspect_checkpoint
    from compactlm.compress.data import check_data
    from compactlm.compress.importance import ImportanceConfig
    from compactlm.compress.operations import prune_checkpoint
    from compactlm.compress.prune import PruneTarget, needs_scores, parse_layer_ranges, plan
    from compactlm.core.io import check_output

    check_output(out, overwrite)
    sizes = (hidden_size, ffn_hidden_size, num_attention_heads, num_query_groups, num_layers, drop_layers)
    moe = (num_experts, moe_ffn_hidden_size, shared_expert_ffn_hidden_size)
    if all(v is None for v in sizes + moe):
        raise CompactLMError(
            "give a pruning target: --hidden-size, --ffn-hidden-size, --num-attention-heads, --num-query-groups, "
            "--num-layers, --drop-layers, or for a mixture of experts --num-experts, --moe-ffn-hidden-size, "
            "--shared-expert-ffn-hidden-size (nothing given would copy the model unchanged)"
        )
    target = PruneTarget(
        hidden_size=hidden_size,
        ffn_hidden_size=ffn_hidden_size,
        num_attention_heads=num_attention_heads,
        num_query_groups=num_query_groups,
        num_layers=num_layers,
        drop_layers=parse_layer_ranges(drop_layers) if drop_layers else None,
        depth_metric=depth_metric,
        num_experts=num_experts,
        moe_ffn_hidden_size=moe_ffn_hidden_size,
        shared_expert_ffn_hidden_size=shared_expert_ffn_hidden_size,
        expert_metric=expert_metric,
    )
    checkpoint = inspect_checkpoint(model)
    path, config = checkpoint.path, checkpoint.config
    plan(config, target)  # refuse impossible targets before loading anything
    if scores is None and random_seed is None and needs_scores(config, target):  # importance is computed now
        checkpoint.check_length(seq_len, "--seq-len")
        check_data(data)
    result = prune_checkpoint(
        path,
        out,
        target,
        scores_path=scores,
        random_seed=random_seed,
        data=data,
        samples=samples,
        seq_len=seq_len,
        importance=ImportanceConfig(batch_size=batch_size, task_samples=task_samples),
        overwrite=overwrite,
    )
    record = result["record"]
    console.print(
        f"[green]pruned[/] {path} -> [bold]{out}[/]: {record['params_before'] / 1e6:.1f}M -> "
        f"{record['params_after'] / 1e6:.1f}M parameters; dropped layers: {record['dropped_layers'] or 'none'}"
    )


@app.command("eval")
def eval_cmd(
    models: Annotated[list[str], typer.Argument(help="Checkpoint directories or bundled model names.")],
    data: DataOpt = "python-docs",
    samples: SamplesOpt = 32,
    seq_len: SeqLenOpt = 512,
    batch_size: BatchOpt = 4,
    tasks: Annotated[
        str | None,
        typer.Option(
            help="Also score multiple-choice accuracy on these BIG-bench tasks, comma-separated (`all`: every "
            "registered one), e.g. winowhy,social_iqa,strategyqa,general_knowledge. Pulled once into the cache."
        ),
    ] = None,
    task_limit: Annotated[
        int, typer.Option(help="Examples per task: a fixed seeded subset, the same for every model.")
    ] = 100,
    harness: Annotated[
        str,
        typer.Option(
            help="compactlm (the fast scorer, default) or lm-eval (EleutherAI's lm-evaluation-harness in process: "
            "the bundled tasks offline, any lm-eval task name where its data set can be downloaded)."
        ),
    ] = "compactlm",
    num_fewshot: Annotated[int | None, typer.Option(help="lm-eval: few-shot examples per prompt.")] = None,
    general: Annotated[
        str,
        typer.Option(
            help="Also the perplexity on this held-out text, the same number of sequences: `english` (general "
            "English no training reads: Carroll, Shakespeare, Milton, a report; pulled once, 7.4 MB), another corpus "
            "or file, or `none`."
        ),
    ] = "english",
    out: Annotated[Path | None, typer.Option(help="Also save the table (.csv or .parquet).")] = None,
) -> None:
    """Held-out LM loss and perplexity of one or more models, side by side (the held-out split only), and
    optionally multiple-choice task accuracy against chance (log-likelihood over the choice's length in
    characters: lm-eval's acc_norm, with either harness)."""
    from compactlm.compress.checkpoint import inspect_checkpoint
    from compactlm.compress.data import check_data
    from compactlm.compress.operations import evaluate_models
    from compactlm.compress.tables import results_table
    from compactlm.compress.tasks import resolve_task_names

    if out is not None and out.suffix not in (".csv", ".parquet"):
        raise CompactLMError("--out must end in .csv or .parquet")
    if harness == "lm-eval" and tasks:
        from compactlm.compress.tasks import TASKS

        task_names = [t.strip() for t in tasks.split(",") if t.strip()]
        task_names = list(TASKS) if "all" in task_names else task_names
    else:
        task_names = resolve_task_names(tasks)
    if task_limit < 1:
        raise CompactLMError("--task-limit must be at least 1")
    checkpoints = [inspect_checkpoint(m) for m in models]  # validate every model before evaluating any
    for checkpoint in checkpoints:
        checkpoint.check_length(seq_len, "--seq-len")
    paths = [c.path for c in checkpoints]
    check_data(data, split="heldout")
    general_data = None if general == "none" or general == data else general
    frame = evaluate_models(
        paths,
        data,
        samples,
        seq_len,
        batch_size,
        names=models,
        tasks=task_names,
        task_limit=task_limit,
        harness=harness,
        num_fewshot=num_fewshot,
        general=general_data,
    )
    extra = [c for c in frame.columns if c.startswith(("chance_", "n_", "seconds_"))]
    also = f"; general_*: {general_data}" if general_data else ""
    title = f"held-out perplexity ({data}{also}, {samples} x {seq_len} tokens)"
    table = results_table(frame.drop(columns=extra), title=title + (" and task accuracy" if task_names else ""))
    if task_names:  # chance as a last row under the accuracies
        table.add_section()
        first = frame.iloc[0]  # every model is scored on the same examples
        cells = [f"{first['chance_' + c.header[4:]]:.3f}" if c.header.startswith("acc_") else "" for c in table.columns]
        table.add_row("chance", *cells[1:])
        counts = ", ".join(f"{t} {first['n_' + t]}" for t in task_names)
        how = "lm-evaluation-harness" if harness == "lm-eval" else "compactlm's scorer"
        seconds = ", ".join(f"{m} {t:.0f} s" for m, t in zip(frame["model"], frame["seconds_tasks"], strict=True))
        table.caption = (
            f"acc_<task>: multiple-choice accuracy, {how} (acc_norm: log-likelihood / choice characters); "
            f"examples: {counts}; scoring time: {seconds}"
        )
    console.print(table)
    if out is not None:
        if out.suffix == ".parquet":
            frame.to_parquet(out, index=False)
        else:
            frame.to_csv(out, index=False)
        console.print(f"saved to {out}")


for group in (train, search, quantize, chain, generate):
    group.register(app)
