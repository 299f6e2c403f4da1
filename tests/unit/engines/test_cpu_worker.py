"""The cpu engine with its pipeline in a recycled worker process (`load_engine(..., recycle=True)`, what `compactlm
serve` runs): same tokens as in process, replaced when grown without losing a request, a dead worker fails only
the requests it held, nothing left running after close."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from compactlm.engines import BuildConfig, Limits, Request, build_engine, load_engine
from compactlm.engines.backends.openvino.export import is_ready
from compactlm.engines.runtime import Sampling
from compactlm.serve.metrics import ServeMetrics
from tests.helpers import hf_greedy, random_tokens, tiny_model

pytestmark = pytest.mark.skipif(not is_ready(), reason="the OpenVINO exporter venv is not set up")
LIMITS = Limits(max_batch_size=4, max_input_len=32, max_seq_len=96, max_num_tokens=256)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as handle:  # a zombie not reaped yet counts as gone
            return handle.read().split()[2] == "Z"
    except FileNotFoundError:  # reaped between the two looks
        return True


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("worker")
    model = tiny_model("llama").eval()
    model.save_pretrained(root / "ckpt")
    out = build_engine(root / "ckpt", root / "cpu", BuildConfig(backend="cpu", precision="fp32", limits=LIMITS))
    prompts = [random_tokens(1, n, seed=n)[0].tolist() for n in (5, 12, 20, 9)]
    return {"dir": out, "prompts": prompts, "want": hf_greedy(model, prompts, 16), "ckpt": root / "ckpt"}


def test_a_recycled_engine_generates_what_the_in_process_one_does(engine_dir):
    prompts = engine_dir["prompts"]
    sampled = Request(tuple(prompts[1]), 12, True, sampling=Sampling(temperature=0.9, top_p=0.9, seed=7), logprobs=0)
    with load_engine(engine_dir["dir"], recycle=True) as engine:
        assert engine.recycle and engine._stepper.pid != os.getpid()
        assert [c.tokens for c in engine.generate(prompts, 16, ignore_eos=True)] == engine_dir["want"]
        remote = engine.submit(sampled).result(timeout=60)
    with load_engine(engine_dir["dir"]) as engine:
        local = engine.submit(sampled).result(timeout=60)
    assert remote.tokens == local.tokens and len(remote.tokens) == 12
    assert remote.logprobs == pytest.approx(local.logprobs, abs=1e-5)


def test_a_grown_worker_is_replaced_when_idle_and_nothing_is_lost(engine_dir):
    with load_engine(engine_dir["dir"], recycle=True) as engine:
        first = engine._stepper.pid
        assert engine.recycle_above > engine._stepper.ready_rss  # model + the whole KV cache + slack
        engine.recycle_above = 0  # as if it had grown past its bound
        assert [c.tokens for c in engine.generate(engine_dir["prompts"], 16, ignore_eos=True)] == engine_dir["want"]
        deadline = time.monotonic() + 60
        while engine.recycles == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.recycles == 1 and engine._stepper.pid != first
        assert _gone(first)
        assert [c.tokens for c in engine.generate(engine_dir["prompts"], 16, ignore_eos=True)] == engine_dir["want"]
        last = engine._stepper.pid
    assert _gone(last)  # close stops the worker


def test_a_dead_worker_fails_the_requests_it_held_and_the_next_ones_run(engine_dir):
    prompts, want = engine_dir["prompts"], engine_dir["want"]
    with load_engine(engine_dir["dir"], recycle=True) as engine:
        stream = engine.submit(Request(tuple(prompts[0]), 60, True))
        assert stream.take(block=True)  # it is running in the worker
        os.kill(engine._stepper.pid, signal.SIGKILL)
        result = stream.result(timeout=60)
        assert result.finish_reason == "error" and "worker process died" in result.error
        again = engine.submit(Request(tuple(prompts[0]), 16, True)).result(timeout=120)
        assert again.error is None and again.tokens == want[0]
        assert engine.recycles == 0  # a crash is not a planned replacement


def test_a_cancelled_request_frees_its_slot_in_the_worker(engine_dir):
    prompts = engine_dir["prompts"]
    with load_engine(engine_dir["dir"], recycle=True) as engine:
        long = engine.submit(Request(tuple(prompts[2]), 70, True))
        assert long.take(block=True)
        long.cancel()
        assert long.result(timeout=30).finish_reason == "cancelled"
        assert len(long.result().tokens) < 70
        assert [c.tokens for c in engine.generate(prompts, 16, ignore_eos=True)] == engine_dir["want"]


def test_options_a_backend_does_not_take_are_ignored(engine_dir, tmp_path):
    torch_dir = build_engine(engine_dir["ckpt"], tmp_path / "torch", BuildConfig(backend="torch", limits=LIMITS))
    with load_engine(torch_dir, recycle=True) as engine:
        assert [c.tokens for c in engine.generate(engine_dir["prompts"], 16, ignore_eos=True)] == engine_dir["want"]


def test_a_grown_worker_that_is_never_idle_hands_over_to_a_new_one_without_losing_a_request(engine_dir):
    prompts, want = engine_dir["prompts"], engine_dir["want"]
    done, stop = [], threading.Event()
    with load_engine(engine_dir["dir"], recycle=True, recycle_above_mb=1) as engine:  # always past its bound
        first = engine._stepper.pid

        def client(k: int) -> None:  # four clients, each sending its next request as its last one ends
            n = 0
            while not stop.is_set():
                length = 10 + (7 * k + 13 * n) % 50  # lengths that differ, so the engine is (almost) never idle
                done.append((k, length, engine.submit(Request(tuple(prompts[k]), length, True)).result(timeout=60)))
                n += 1

        clients = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for thread in clients:
            thread.start()
        deadline = time.monotonic() + 90
        while engine.handovers == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        stop.set()
        for thread in clients:
            thread.join(timeout=120)
        assert engine.handovers >= 1 and engine._stepper.pid != first
        assert _gone(first)  # the old worker exited once it had finished its requests
        assert done and all(c.error is None and len(c.tokens) == n for _, n, c in done), [c.error for *_, c in done]
        assert all(c.tokens[:16] == want[k][:n] for k, n, c in done)  # greedy: a prefix of the 16-token answer
        assert [c.tokens for c in engine.generate(prompts, 16, ignore_eos=True)] == want
        page = ServeMetrics(engine, "tiny").render()[0].decode()  # what a scrape of `compactlm serve` shows
        assert f"compactlm:engine_worker_replacements_total {float(engine.recycles)}" in page
        resident = next(float(line.split()[1]) for line in page.splitlines() if line.startswith("compactlm:engine_res"))
        assert resident >= engine._stepper.rss > 0  # the server's process and its worker
