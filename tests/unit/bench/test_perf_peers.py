"""The CPU-peers benchmark's own logic: the arithmetic a run needs, llama-batched-bench's command and output, the
SIGILL fallback, the roofline each run is read against. llama.cpp itself is stood in for by a script."""

import os
import stat
import types

import pytest

from compactlm.bench.perf import cpu_peers, llama_cpp, roofline

SMOLLM2 = types.SimpleNamespace(
    hidden_size=576,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    intermediate_size=1536,
    vocab_size=49152,
)


def test_run_flops_counts_linear_head_and_attention_by_hand():
    tiny = types.SimpleNamespace(
        hidden_size=4,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=2,
        intermediate_size=8,
        vocab_size=10,
    )
    # q, o: 4x4 each; k, v: 4x2 each; mlp: 3 x 4x8 -> 32 + 16 + 96 = 144 MACs a position
    # isl 3, osl 2: 4 positions through the layers, 2 through the head (40 MACs), attention 1+2+3+4 = 10 positions
    # of context x 2 heads x 2 dims x 2 (QK, PV)
    expected = 2 * 144 * 4 + 2 * 40 * 2 + 2 * 2 * 2 * 2 * 10
    assert roofline.run_flops(tiny, 1, 3, 2) == expected
    assert roofline.run_flops(tiny, 5, 3, 2) == 5 * expected


def test_run_flops_of_the_issue_workload():
    # issue 22: "a run is 2.04 TFLOP" (SmolLM2-135M, batch 32, 128/128)
    assert roofline.run_flops(SMOLLM2, 32, 128, 128) / 1e12 == pytest.approx(2.04, rel=0.05)


def test_gemm_calibration_reports_every_shape(monkeypatch):
    monkeypatch.setattr(roofline, "SHAPES", ((64, 32, 16), (8, 8, 8)))
    peak = roofline.gemm_flops_per_s("f32", 1, repeats=2)
    assert set(peak["by_shape"]) == {"64x32x16", "8x8x8"}
    assert peak["gflops"] == max(peak["by_shape"].values()) > 0


FAKE_BENCH = """#!/bin/sh
case "$*" in *--no-repack*) ;; *) [ -n "$FAULT" ] && kill -ILL $$ ;; esac
echo "0.00.288 I load_tensors:   CPU_REPACK model buffer size =   10.00 MiB" >&2
echo "$*" > "$ARGS_OUT"
echo '{"pp": 128, "tg": 127, "pl": 8, "t_pp": 0.5, "t_tg": 3.5, "t": 4.0, "speed": 1.0}'
"""


@pytest.fixture
def fake_llama(tmp_path, monkeypatch):
    bench = tmp_path / "llama-batched-bench"
    bench.write_text(FAKE_BENCH)
    bench.chmod(bench.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(llama_cpp, "tools", lambda: tmp_path)
    monkeypatch.setattr(llama_cpp, "cpu_features", lambda: "AVX512=1")
    monkeypatch.setenv("ARGS_OUT", str(tmp_path / "args"))
    return tmp_path


def test_runner_runs_our_workload_shape_and_reads_its_timing(fake_llama):
    runner = llama_cpp.Runner(fake_llama / "m.gguf", threads=2).probe()
    assert runner.repack
    assert runner.kernels == "AVX512=1; weights in: CPU_REPACK model buffer size =   10.00 MiB"
    done = runner.run(8, 128, 128)
    args = (fake_llama / "args").read_text().split()
    value = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("-")}
    # the prompt pass gives the first token, osl - 1 decode steps the rest; own prompts; room for all of them
    assert (value["-npp"], value["-ntg"], value["-npl"], value["-t"]) == ("128", "127", "8", "2")
    assert int(value["-c"]) >= 8 * 256 and int(value["-c"]) % 256 == 0
    assert done == llama_cpp.BenchRun(seconds=4.0, prefill_seconds=0.5, output_tokens=8 * 128)


def test_runner_falls_back_to_no_repack_on_sigill(fake_llama, monkeypatch):
    monkeypatch.setenv("FAULT", "1")
    runner = llama_cpp.Runner(fake_llama / "m.gguf", threads=2).probe()
    assert not runner.repack
    assert "--no-repack" in runner.command(1, 8, 2)
    assert runner.run(1, 8, 4).output_tokens == 4


def test_runner_failure_is_reported(fake_llama):
    (fake_llama / "llama-batched-bench").write_text("#!/bin/sh\necho broken >&2\nexit 3\n")
    with pytest.raises(RuntimeError, match="exited 3: broken"):
        llama_cpp.Runner(fake_llama / "m.gguf", threads=2).probe()


def test_unknown_gguf_format_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPACTLM_LLAMA_CPP", str(tmp_path))
    with pytest.raises(SystemExit, match="unknown GGUF format 'Q3'"):
        llama_cpp.gguf(tmp_path, "0" * 64, "Q3")
    with pytest.raises(SystemExit, match="unknown GGUF format"):
        cpu_peers.parse_pairs("fp32=F32,int4=Q3")
    assert cpu_peers.parse_pairs("fp32=F32,int4=Q4_K_M") == {"fp32": "F32", "int4": "Q4_K_M"}
    assert not os.listdir(tmp_path)  # nothing downloaded or written


def test_each_run_is_read_against_its_compute_type():
    peaks = {"f32": {"dtype": "f32"}, "bf16": {"dtype": "bf16"}}
    read = {
        run: cpu_peers.peak_for(run, peaks)["dtype"]
        for run in (
            "transformers fp32",
            "fp32 compactlm",
            "fp32 bare pipeline",
            "llama.cpp F32",
            "llama.cpp Q4_0",
            "bf16 compactlm",
            "int8 compactlm",
            "int4 stock pipeline",
            "llama.cpp BF16",
        )
    }
    assert [read[r] for r in read] == ["f32"] * 5 + ["bf16"] * 4
    assert cpu_peers.peak_for("int8 compactlm", {"f32": {"dtype": "f32"}})["dtype"] == "f32"  # no bf16 units


def test_missing_build_tools_are_named_unless_llama_cpp_is_built(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPACTLM_LLAMA_CPP", str(tmp_path))
    monkeypatch.setattr(llama_cpp.shutil, "which", lambda tool: None if tool == "ninja" else f"/usr/bin/{tool}")
    assert llama_cpp.available() == "llama.cpp needs ninja to build"
    (tmp_path / "build" / "bin").mkdir(parents=True)
    for tool in llama_cpp.TARGETS:
        (tmp_path / "build" / "bin" / tool).write_text("")
    assert llama_cpp.available() is None
