"""The engine builder's shared parts: limits, the manifest, the sweep file, the runtime interface, the registry."""

from __future__ import annotations

import json
import threading
import time

import pytest

from compactlm.compress.checkpoint import checkpoint_sha256
from compactlm.core.errors import CompactLMError
from compactlm.engines.config import BuildConfig, Limits
from compactlm.engines.manifest import Manifest, read_manifest, write_manifest
from compactlm.engines.registry import get_backend, list_backends
from compactlm.engines.runtime import Engine, Request


def make_manifest(**limits) -> Manifest:
    return Manifest(
        backend="test",
        precision="fp32",
        limits=Limits(**limits),
        tp_size=1,
        source={"path": "/x", "sha256": "0" * 64, "record": None},
        model={"num_layers": 2, "params": 1000},
        backend_info={"eos_token_ids": [2]},
    )


class EchoEngine(Engine):
    """Scripted engine: each step emits token (step count) for every active request, `delay` seconds per step."""

    def __init__(self, delay: float = 0.0, **limits):
        super().__init__("/nonexistent", make_manifest(**limits))
        self.delay = delay
        self.step_batches: list[int] = []

    def _serve(self):
        active = []
        while not self._closed.is_set():
            active += self._drain(block=not active, limit=self.limits.max_batch_size - len(active))
            if not active:
                continue
            time.sleep(self.delay)
            self.step_batches.append(len(active))
            for stream in list(active):
                stream.push([len(stream.tokens)])
                if len(stream.tokens) == stream.request.max_new_tokens:
                    stream.finish("length")
                    active.remove(stream)
        for stream in active:
            stream.finish("cancelled")


def test_limits_refuse_bad_values_and_requests():
    with pytest.raises(CompactLMError, match="max_batch_size must be a positive integer"):
        Limits(max_batch_size=0)
    with pytest.raises(CompactLMError, match="must be below max_seq_len"):
        Limits(max_input_len=64, max_seq_len=64)
    limits = Limits(max_batch_size=4, max_input_len=16, max_seq_len=24)
    limits.check_request(16, 8)
    with pytest.raises(CompactLMError, match="longer than the engine's max_input_len 16"):
        limits.check_request(17, 1)
    with pytest.raises(CompactLMError, match="exceeds the engine's max_seq_len 24"):
        limits.check_request(16, 9)
    with pytest.raises(CompactLMError, match="max_batch_size 4"):
        limits.check_shape(8, 8, batch_size=5)
    assert Limits.from_dict({**limits.to_dict(), "unknown": 1}) == limits


def test_manifest_round_trip_and_refusals(tmp_path):
    manifest = make_manifest(max_batch_size=3)
    write_manifest(tmp_path, manifest)
    again = read_manifest(tmp_path)
    assert again == manifest and again.limits.max_batch_size == 3
    with pytest.raises(CompactLMError, match="is not a compactlm engine"):
        read_manifest(tmp_path / "..")
    (tmp_path / "engine.json").write_text(json.dumps({**manifest.to_dict(), "format": 99}))
    with pytest.raises(CompactLMError, match="format 99"):
        read_manifest(tmp_path)
    (tmp_path / "engine.json").write_text("{not json")
    with pytest.raises(CompactLMError, match="not a valid engine manifest"):
        read_manifest(tmp_path)


def test_checkpoint_hash_follows_content(tiny_dir):
    first = checkpoint_sha256(tiny_dir)
    assert first == checkpoint_sha256(tiny_dir)
    weights = next(tiny_dir.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert checkpoint_sha256(tiny_dir) != first


def test_registry_lists_backends_and_names_them_in_errors():
    names = [b.name for b in list_backends()]
    assert {"cpu", "torch", "trtllm"} <= set(names)
    with pytest.raises(CompactLMError, match="unknown backend 'tensorrt'; choose from cpu, torch, trtllm"):
        get_backend("tensorrt")
    with pytest.raises(CompactLMError, match="no precision 'fp8'; choose from fp32, bf16, int8, int4"):
        get_backend("cpu").resolve_precision("fp8")
    assert get_backend("cpu").resolve_precision(None) == "fp32"


def test_build_config_validates():
    with pytest.raises(CompactLMError, match="tp_size"):
        BuildConfig(tp_size=0)


def test_streams_deliver_tokens_in_order_with_times():
    with EchoEngine(delay=0.002, max_batch_size=4) as engine:
        stream = engine.submit(Request((1, 2, 3), max_new_tokens=5))
        chunks = list(stream)
        done = stream.result(timeout=5)
    assert [t for chunk, _ in chunks for t in chunk] == [0, 1, 2, 3, 4] == done.tokens
    assert done.finish_reason == "length" and done.prompt_len == 3
    assert all(b >= a for a, b in zip(done.token_times, done.token_times[1:], strict=False))
    assert done.ttft >= 0.002 and done.e2e >= 5 * 0.002 * 0.9
    assert len(done.itl) == 4 and min(done.itl) > 0


def test_engine_batches_up_to_its_limit_and_continues_batching():
    engine = EchoEngine(delay=0.001, max_batch_size=3)
    completions = engine.generate([[1]] * 7, max_new_tokens=4)
    engine.close()
    assert [c.tokens for c in completions] == [[0, 1, 2, 3]] * 7
    assert max(engine.step_batches) == 3
    assert sum(engine.step_batches) == 7 * 4


def test_submit_refuses_requests_beyond_the_limits_before_queueing():
    engine = EchoEngine(max_input_len=4, max_seq_len=8)
    with pytest.raises(CompactLMError, match="max_input_len 4"):
        engine.submit(Request(tuple(range(5)), max_new_tokens=1))
    with pytest.raises(CompactLMError, match="max_seq_len 8"):
        engine.submit(Request((1, 2), max_new_tokens=7))
    assert engine._worker is None  # nothing was started for refused requests
    engine.close()
    with pytest.raises(CompactLMError, match="closed"):
        engine.submit(Request((1,), 1))


def test_close_cancels_running_requests():
    engine = EchoEngine(delay=0.01, max_seq_len=2000)
    stream = engine.submit(Request((1,), max_new_tokens=1000))
    while not stream.tokens:
        time.sleep(0.001)
    engine.close()
    done = stream.result(timeout=5)
    assert done.finish_reason == "cancelled" and 0 < len(done.tokens) < 1000


class BrokenEngine(EchoEngine):
    def _serve(self):
        self._drain(block=True)
        raise RuntimeError("kernel exploded")


def test_a_dying_worker_fails_its_requests_and_refuses_new_ones():
    engine = BrokenEngine()
    threading.excepthook, hook = (lambda args: None), threading.excepthook  # the worker's traceback is expected
    try:
        first = engine.submit(Request((1,), 2))
        engine._worker.join(timeout=5)
    finally:
        threading.excepthook = hook
    second_error = None
    try:
        engine.submit(Request((1,), 2))
    except CompactLMError as exc:
        second_error = str(exc)
    assert "kernel exploded" in (second_error or "")
    done = first.result(timeout=5)  # taken by the worker before it died: failed, not left hanging
    assert done.finish_reason == "error" and "kernel exploded" in done.error


def test_a_build_resolves_its_checkpoint_once_and_hands_it_to_the_backend(tiny_dir, tmp_path, monkeypatch):
    import compactlm.compress.checkpoint
    import compactlm.compress.models
    from compactlm.compress.checkpoint import Checkpoint
    from compactlm.engines import BuildConfig, build_engine

    calls = {"resolve": 0, "read_config": 0, "check_weights": 0}
    for module, name in (
        (compactlm.compress.models, "resolve"),
        (compactlm.compress.checkpoint, "read_config"),
        (compactlm.compress.checkpoint, "check_weights"),
    ):
        real = getattr(module, name)
        monkeypatch.setattr(
            module,
            name,
            lambda *a, _real=real, _name=name, **k: calls.update({_name: calls[_name] + 1}) or _real(*a, **k),
        )
    seen = []
    backend = get_backend("torch")
    real_build = type(backend).build
    monkeypatch.setattr(
        type(backend), "build", lambda self, ckpt, out, cfg: seen.append(ckpt) or real_build(self, ckpt, out, cfg)
    )
    limits = Limits(max_batch_size=2, max_input_len=32, max_seq_len=64, max_num_tokens=64)
    build_engine(tiny_dir, tmp_path / "engine", BuildConfig(backend="torch", limits=limits))
    assert calls == {"resolve": 1, "read_config": 1, "check_weights": 1}
    assert isinstance(seen[0], Checkpoint) and seen[0].path == tiny_dir and seen[0].family == "llama"


def test_a_finished_request_is_not_kept_by_the_engine(tiny_dir, tmp_path):
    """The runtime layer keeps nothing of a request once its caller lets go of it (streams, timings, prompts):
    after 1,000 requests no stream but the last batch's is alive, and RSS grew by no more than a few MB after a
    warm-up."""
    import gc
    import weakref

    import psutil

    from compactlm.engines import BuildConfig, build_engine, load_engine
    from compactlm.engines.runtime import Request

    limits = Limits(max_batch_size=8, max_input_len=16, max_seq_len=32, max_num_tokens=64)
    build_engine(tiny_dir, tmp_path / "engine", BuildConfig(backend="torch", limits=limits))
    process = psutil.Process()
    with load_engine(tmp_path / "engine") as engine:
        refs = []

        def wave(n: int) -> None:
            streams = [engine.submit(Request((1 + i % 200, 2, 3, 4), 4, ignore_eos=True)) for i in range(n)]
            for stream in streams:
                assert len(stream.result().tokens) == 4
            refs.extend(weakref.ref(s) for s in streams)

        for _ in range(25):
            wave(8)  # warm-up
        gc.collect()
        before = process.memory_info().rss
        for _ in range(125):
            wave(8)
        gc.collect()
        grown = process.memory_info().rss - before
    alive = [i for i, r in enumerate(refs) if r() is not None]
    # at most the last batch, still named by the worker's loop until the next request comes: bounded, not growing
    assert len(alive) <= limits.max_batch_size and all(i >= len(refs) - limits.max_batch_size for i in alive)
    assert grown < 8 * 2**20, f"RSS grew {grown / 2**20:.1f} MiB over 1,000 requests"
