"""The command lines that serve and benchmark a `trtllm` engine folder at the shapes it was sized for, run from
inside the folder: trtllm-serve (OpenAI API), trtllm-bench (its dataset, then throughput at each batch size), vLLM
(which loads the same checkpoint, FP8 included), and compactlm's own client against whichever server is up.

Options are TensorRT-LLM's and vLLM's own spellings: `trtllm-serve MODEL --host --port --backend pytorch --config
YAML`; `trtllm-bench --model NAME --model_path DIR prepare-dataset --output F token-norm-dist --num-requests N
--input-mean --input-stdev --output-mean --output-stdev` and `... throughput --dataset F --backend pytorch --config
YAML --concurrency N --num_requests N`. The limits live in the YAML, so the CLIs do not repeat (and cannot
contradict) them.
"""

from __future__ import annotations

import shlex

from compactlm.engines.config import BuildConfig

HOST, PORT = "127.0.0.1", 8000
CHECKPOINT_DIR, LLM_ARGS_FILE, DATASET = "checkpoint", "llm_args.yaml", "dataset-{isl}x{osl}.jsonl"
REQUESTS_PER_SLOT = 8
"""trtllm-bench requests per in-flight request: enough for a steady state at each concurrency."""


def bench_points(config: BuildConfig) -> tuple[list[tuple[int, int]], list[int]]:
    """The (ISL, OSL) shapes and batch sizes to benchmark: the sweep's when the build was sized for one, else one
    shape of up to 128/128 that fits the limits, at the largest batch."""
    limits = config.limits
    if config.bench_shapes:
        return list(config.bench_shapes), list(config.bench_batches or (limits.max_batch_size,))
    isl = min(128, limits.max_input_len)
    return [(isl, min(128, limits.max_seq_len - isl))], [limits.max_batch_size]


def command_lines(config: BuildConfig, name: str = "model") -> dict:
    """{"trtllm_serve", "vllm_serve", "compactlm_bench": str, "trtllm_bench": [{isl, osl, prepare, throughput}]}."""
    limits = config.limits
    shapes, batches = bench_points(config)
    serve = ["trtllm-serve", CHECKPOINT_DIR, "--host", HOST, "--port", str(PORT), "--backend", "pytorch"]
    serve += ["--config", LLM_ARGS_FILE]
    vllm = ["vllm", "serve", CHECKPOINT_DIR, "--host", HOST, "--port", str(PORT)]
    vllm += ["--tensor-parallel-size", str(config.tp_size), "--max-model-len", str(limits.max_seq_len)]
    vllm += ["--max-num-seqs", str(limits.max_batch_size)]
    vllm += ["--max-num-batched-tokens", str(max(limits.max_num_tokens, limits.max_seq_len))]
    bench = []
    base = ["trtllm-bench", "--model", name, "--model_path", CHECKPOINT_DIR]
    for isl, osl in shapes:
        dataset = DATASET.format(isl=isl, osl=osl)
        requests = REQUESTS_PER_SLOT * max(batches)
        prepare = [*base, "prepare-dataset", "--output", dataset, "token-norm-dist", "--num-requests", str(requests)]
        prepare += ["--input-mean", str(isl), "--input-stdev", "0", "--output-mean", str(osl), "--output-stdev", "0"]
        runs = []
        for batch in batches:
            run = [*base, "throughput", "--dataset", dataset, "--backend", "pytorch", "--config", LLM_ARGS_FILE]
            run += ["--concurrency", str(batch), "--num_requests", str(REQUESTS_PER_SLOT * batch)]
            runs.append(shlex.join(run))
        bench.append({"isl": isl, "osl": osl, "prepare": shlex.join(prepare), "throughput": runs})
    isl, osl = shapes[0]
    client = ["compactlm", "bench", "measure", f"http://{HOST}:{PORT}", "--isl", str(isl), "--osl", str(osl)]
    client += ["--concurrency", ",".join(map(str, batches)), "--tokenizer", CHECKPOINT_DIR]
    return {
        "trtllm_serve": shlex.join(serve),
        "vllm_serve": shlex.join(vllm),
        "trtllm_bench": bench,
        "compactlm_bench": shlex.join(client),
    }
