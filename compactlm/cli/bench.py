"""`compactlm bench ...`: run a benchmark, run a sweep file, write a report, make a dataset."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from compactlm.core.console import console
from compactlm.core.errors import CompactLMError

app = typer.Typer(
    help="Benchmarks: request throughput and latency of engines and servers, sweeps, reports.", no_args_is_help=True
)

TargetArg = Annotated[
    str,
    typer.Argument(
        help="An engine folder, an OpenAI-compatible server (http://HOST:PORT), a Triton server "
        "(triton://HOST:8001/MODEL for gRPC, triton+http://HOST:8000/MODEL for HTTP), or `null` (the harness alone)."
    ),
]
OutOpt = Annotated[Path, typer.Option(help="Results file (.parquet or .csv); rows are appended as points finish.")]
NameOpt = Annotated[str | None, typer.Option(help="Name of the target in the results (default: the model's).")]
ModelOpt = Annotated[str | None, typer.Option(help="Served model name (OpenAI: default the first of /v1/models).")]
VocabOpt = Annotated[int | None, typer.Option(help="Vocabulary size for random prompts to a remote target.")]
TokenizerOpt = Annotated[
    Path | None, typer.Option(help="Tokenizer folder for a remote target (text prompts, vocabulary size).")
]


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise CompactLMError(f"{option} takes comma-separated integers, not {text!r}") from exc
    if not values:
        raise CompactLMError(f"{option} is empty")
    return values


def _floats(text: str, option: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise CompactLMError(f"{option} takes comma-separated numbers, not {text!r}") from exc


def _command_line() -> str:
    return "compactlm " + " ".join(shlex.quote(a) for a in sys.argv[1:])


@app.command("measure")
def measure_cmd(
    target: TargetArg,
    isl: Annotated[int, typer.Option(help="Input length (prompt tokens) of every request.")] = 128,
    osl: Annotated[int, typer.Option(help="Output length: tokens generated per request (EOS ignored).")] = 128,
    concurrency: Annotated[
        str, typer.Option("--concurrency", "--batch-size", help="Requests in flight, comma-separated for a sweep.")
    ] = "1",
    rate: Annotated[
        str | None, typer.Option(help="Request rates (req/s, comma-separated): rate mode instead of concurrency.")
    ] = None,
    arrivals: Annotated[str, typer.Option(help="Rate mode arrivals: poisson or constant.")] = "poisson",
    offline: Annotated[bool, typer.Option("--offline", help="Submit every request at once (throughput mode).")] = False,
    requests: Annotated[
        str, typer.Option(help='Measured requests per point, or "Nx": N per in-flight request (N x concurrency).')
    ] = "32",
    warmup: Annotated[int, typer.Option(help="Requests sent first at each point, not counted.")] = 2,
    repeats: Annotated[int, typer.Option(help="Times each point is measured (confidence intervals).")] = 1,
    duration: Annotated[
        float | None, typer.Option(help="Measurement window in seconds: send requests for this long instead.")
    ] = None,
    input_stdev: Annotated[float, typer.Option(help="Normal spread of input lengths (tokens).")] = 0.0,
    output_stdev: Annotated[float, typer.Option(help="Normal spread of output lengths (tokens).")] = 0.0,
    source: Annotated[str, typer.Option(help="Prompt tokens: random, python-docs or linux-docs.")] = "random",
    dataset: Annotated[
        Path | None, typer.Option(help="A trtllm-bench JSONL dataset instead of synthetic requests.")
    ] = None,
    slo_ttft_ms: Annotated[float | None, typer.Option(help="Goodput SLO on time to first token (ms).")] = None,
    slo_tpot_ms: Annotated[float | None, typer.Option(help="Goodput SLO on time per output token (ms).")] = None,
    slo_e2e_ms: Annotated[float | None, typer.Option(help="Goodput SLO on end-to-end latency (ms).")] = None,
    out: OutOpt = Path("bench-results.parquet"),
    name: NameOpt = None,
    model: ModelOpt = None,
    vocab_size: VocabOpt = None,
    tokenizer: TokenizerOpt = None,
    seed: Annotated[int, typer.Option(help="Seeds prompts and arrivals.")] = 0,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for one request before counting it failed.")] = 600,
) -> None:
    """Measure one target at one shape and one or more loads; print a summary, append rows to OUT."""
    from compactlm.bench.loadgen import Load
    from compactlm.bench.metrics import Slo
    from compactlm.bench.report import summary_table
    from compactlm.bench.results import ResultsFile
    from compactlm.bench.runner import check_limits, plan, run_benchmark
    from compactlm.bench.targets import open_target
    from compactlm.bench.workload import DatasetWorkload, load_jsonl

    results = ResultsFile(out)
    slo = Slo(slo_ttft_ms, slo_tpot_ms, slo_e2e_ms)
    if sum([offline, rate is not None]) > 1:
        raise CompactLMError("choose one load: --offline, --rate or --concurrency")
    if offline:
        loads = [Load("offline")]
    elif rate is not None:
        loads = [Load("rate", rate=r, arrivals=arrivals, duration=duration) for r in _floats(rate, "--rate")]
    else:
        loads = [Load("concurrency", concurrency=c, duration=duration) for c in _ints(concurrency, "--concurrency")]
    count = int(requests) if requests.isdigit() else requests
    if count in (0, "0x") or warmup < 0 or repeats < 1:
        raise CompactLMError("--requests and --repeats must be >= 1, --warmup >= 0")
    if dataset is None:  # refuse shapes beyond an engine's limits before even loading it
        points = plan([(isl, osl)], loads, count, warmup, repeats, input_stdev, output_stdev, source, seed)
        check_limits(target, name, points)
    with open_target(target, name, model=model, vocab_size=vocab_size, tokenizer=tokenizer) as opened:
        options = {}
        if dataset is not None:
            shared = DatasetWorkload(load_jsonl(dataset, lambda: opened.tokenizer), str(dataset))
            spec = shared.spec
            isl, osl, input_stdev, output_stdev = spec.input_len, spec.output_len, spec.input_stdev, spec.output_stdev
            source = str(dataset)
            options.update(workload_for=lambda _target, _spec: shared, longest=shared.max_lengths())
            points = plan([(isl, osl)], loads, count, warmup, repeats, input_stdev, output_stdev, source, seed)
        frame = run_benchmark(opened, points, results, slo, timeout=timeout, **options)
    console.print(summary_table(frame, title=f"{opened.name}: {isl}/{osl}"))
    console.print(f"results appended to {out}")
    _fail_if_nothing_completed(frame)


def _fail_if_nothing_completed(frame) -> None:
    """A run in which no request completed measured nothing: exit 2 with the first error (a dead server, say)."""
    if len(frame) and "completed" in frame and int(frame["completed"].sum()) == 0:
        example = next((e for e in frame.get("error_example", []) if isinstance(e, str) and e), "no error given")
        raise CompactLMError(f"no request completed ({int(frame['errors'].sum())} failed); the first: {example}")


@app.command("sweep")
def sweep_cmd(
    sweep_file: Annotated[Path, typer.Argument(help="The sweep file (YAML): shapes, batch sizes, engines, repeats.")],
    out: Annotated[Path | None, typer.Option(help="Results file (default: the sweep's `out`).")] = None,
) -> None:
    """Run a sweep file: every engine x shape x load x repeat; rows appended to OUT as points finish."""
    from compactlm.bench.metrics import Slo
    from compactlm.bench.report import summary_table
    from compactlm.bench.results import ResultsFile, new_run_id, read_table
    from compactlm.bench.runner import check_limits, run_benchmark, sweep_plan
    from compactlm.bench.sweep import load_sweep
    from compactlm.bench.targets import open_target

    sweep = load_sweep(sweep_file)
    if not sweep.engines:
        raise CompactLMError(f"{sweep_file}: sweep field 'engines' is empty: nothing to measure")
    path = out or (Path(sweep.out) if sweep.out else None)
    if path is None:
        raise CompactLMError("give --out or the sweep field 'out': where the results go")
    results = ResultsFile(path)
    points = sweep_plan(sweep)
    run_id = new_run_id()
    slo = Slo(**sweep.slo)
    for name, spec in sweep.targets():  # every engine's limits are checked before anything is measured
        check_limits(spec, name, points)
    for name, spec in sweep.targets():  # one engine loaded at a time
        with open_target(spec, name, vocab_size=sweep.vocab_size, tokenizer=sweep.tokenizer) as target:
            run_benchmark(target, points, results, slo, timeout=sweep.request_timeout, run_id=run_id)
    frame = read_table(path)
    console.print(summary_table(frame[frame["run_id"] == run_id], title=f"sweep {sweep_file}"))
    console.print(f"results in {path}; report: compactlm bench report {path} --out DIR")


@app.command("report")
def report_cmd(
    results: Annotated[list[Path], typer.Argument(help="Results files (.parquet or .csv) from bench measure / sweep.")],
    out: Annotated[Path, typer.Option(help="Report folder: report.md, report.html, figures/.")],
    baseline: Annotated[
        str | None, typer.Option(help="Engine to compare against (a model name or label; default the largest).")
    ] = None,
    eval_results: Annotated[
        Path | None, typer.Option("--eval", help="compress eval results (--out of `compress eval`): accuracy column.")
    ] = None,
) -> None:
    """Write a Markdown and HTML report with figures: throughput vs batch size, speedups, latency, accuracy."""
    from compactlm.bench.report import load_eval, write_report
    from compactlm.bench.results import REQUIRED, read_results

    frame = read_results(results, REQUIRED)
    evals = load_eval(eval_results) if eval_results is not None else None
    md, page = write_report(frame, out, baseline, evals, command=_command_line())
    console.print(f"report written: {md} and {page}")


@app.command("dataset")
def dataset_cmd(
    out: Annotated[Path, typer.Argument(help="The JSONL file to write (trtllm-bench's dataset shape).")],
    requests: Annotated[int, typer.Option(help="Number of requests.")] = 100,
    isl: Annotated[int, typer.Option(help="Mean input length.")] = 128,
    osl: Annotated[int, typer.Option(help="Mean output length.")] = 128,
    input_stdev: Annotated[float, typer.Option(help="Normal spread of input lengths.")] = 0.0,
    output_stdev: Annotated[float, typer.Option(help="Normal spread of output lengths.")] = 0.0,
    source: Annotated[str, typer.Option(help="random, python-docs or linux-docs (text needs a tokenizer).")] = "random",
    engine: Annotated[Path | None, typer.Option(help="Take the vocabulary/tokenizer from this engine.")] = None,
    vocab_size: VocabOpt = None,
    tokenizer: TokenizerOpt = None,
    seed: Annotated[int, typer.Option(help="Seeds lengths and prompts.")] = 0,
) -> None:
    """Make a synthetic dataset (like trtllm-bench's `prepare_dataset token-norm-dist`)."""
    from compactlm.bench.workload import Workload, WorkloadSpec, save_jsonl

    if requests < 1:
        raise CompactLMError(f"--requests must be at least 1, not {requests}")
    spec = WorkloadSpec(isl, osl, input_stdev, output_stdev, source, seed)
    tok, exclude = None, ()
    if engine is not None:
        from compactlm.engines.manifest import read_manifest

        manifest = read_manifest(engine)
        vocab_size = vocab_size or manifest.model.get("vocab_size")
        exclude = tuple(manifest.backend_info.get("eos_token_ids", ()))
        if source != "random" and tokenizer is None:
            tokenizer = engine / "tokenizer"
    if tokenizer is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
        vocab_size = vocab_size or len(tok)
    items = Workload(spec, vocab_size, tok, exclude).take(requests)
    save_jsonl(items, out)
    console.print(f"{len(items)} requests written to {out}")
