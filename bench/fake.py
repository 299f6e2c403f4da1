"""Engines with known behaviour, for testing the harness: a scripted one whose delays are exact, a null one.

`ScriptedEngine` batches continuously like the real engines and takes, per step, exactly
`decode_step + decode_per_seq * batch + prefill_per_token * (prompt tokens admitted in the step)` seconds,
every active request getting one token at the end of each step (a newly admitted one its first). Steps are
timed against a running clock: each ends at the previous end + its duration, or, after idling, at the first new
request's submit time + the batch window + its duration; so neither sleep jitter nor thread wake-ups accumulate.
`NullEngine` answers every request at once: what is left is the harness's own cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from compactlm.engines.config import Limits
from compactlm.engines.manifest import Manifest
from compactlm.engines.runtime import Engine


def fake_manifest(backend: str, limits: Limits, vocab_size: int = 32000, params: int = 1_000_000) -> Manifest:
    return Manifest(
        backend=backend,
        precision="none",
        limits=limits,
        tp_size=1,
        source={"path": f"/fake/{backend}", "sha256": "0" * 64, "record": None},
        model={"family": "fake", "vocab_size": vocab_size, "params": params, "num_layers": 1, "hidden_size": 1},
        backend_info={"eos_token_ids": [2]},
    )


@dataclass(frozen=True)
class Script:
    """The delays of a `ScriptedEngine`, in seconds."""

    decode_step: float = 0.02
    decode_per_seq: float = 0.0
    prefill_per_token: float = 0.0
    batch_window: float = 0.0
    """When idle, wait this long after the first request for others to join the first step (a batcher's delay)."""

    def step_time(self, batch: int, new_prompt_tokens: int) -> float:
        return self.decode_step + self.decode_per_seq * batch + self.prefill_per_token * new_prompt_tokens

    def wave(self, input_len: int, output_len: int, batch: int = 1) -> dict[str, float]:
        """The exact latencies of `batch` requests that arrive together at an idle engine (seconds)."""
        first = self.batch_window + self.step_time(batch, batch * input_len)
        itl = self.step_time(batch, 0)
        return {"ttft": first, "itl": itl, "tpot": itl, "e2e": first + (output_len - 1) * itl}


class ScriptedEngine(Engine):
    """Continuous batching with scripted step times (see the module docstring). `fail_after`: die (raise in the
    worker) when that many requests have been admitted, to test a target that dies mid-run."""

    def __init__(self, script: Script | None = None, fail_after: int | None = None, exact_times: bool = True, **limits):
        limits = {"max_batch_size": 64, "max_input_len": 8192, "max_seq_len": 16384, **limits}
        super().__init__("/fake/scripted", fake_manifest("scripted", Limits(**limits)))
        self.script = script or Script()
        self.fail_after = fail_after
        self.exact_times = exact_times
        """Stamp tokens with their scheduled time (the script to the microsecond, whatever the OS's sleep jitter);
        False: with the time they are pushed, as a real engine does."""
        self.admitted = 0
        self.steps: list[tuple[float, int]] = []
        """(end time, batch size) of each step."""

    def _serve(self) -> None:
        script, limit = self.script, self.limits.max_batch_size
        active, clock = [], 0.0
        while not self._closed.is_set():
            new = self._drain(block=not active, limit=limit - len(active))
            if not new and not active:
                continue
            if not active:  # an idle engine starts when the first request arrived (not when its thread woke up)
                clock = min(s.submitted for s in new) + script.batch_window
                if script.batch_window > 0:
                    time.sleep(max(0.0, clock - time.perf_counter()))
                    new += self._drain(block=False, limit=limit - len(new))
            self.admitted += len(new)
            if self.fail_after is not None and self.admitted > self.fail_after:
                raise RuntimeError(f"scripted failure after {self.fail_after} requests")
            active += new
            clock += script.step_time(len(active), sum(len(s.request.prompt) for s in new))
            time.sleep(max(0.0, clock - time.perf_counter()))
            at = clock if self.exact_times else time.perf_counter()
            self.steps.append((at, len(active)))
            for stream in active:
                stream.push([len(stream.tokens) % 1000 + 3], at)
            for stream in [s for s in active if len(s.tokens) >= s.request.max_new_tokens]:
                stream.finish("length")
                active.remove(stream)
        for stream in active:
            stream.finish("cancelled")


class NullEngine(Engine):
    """Answers every request at once with all its tokens (one chunk): a benchmark of it measures the harness."""

    def __init__(self, max_batch_size: int = 1 << 20):
        limits = Limits(
            max_batch_size=max_batch_size, max_input_len=1 << 20, max_seq_len=1 << 21, max_num_tokens=1 << 20
        )
        super().__init__("/fake/null", fake_manifest("null", limits))

    def _serve(self) -> None:
        while not self._closed.is_set():
            for stream in self._drain(block=True):
                stream.push([3] * stream.request.max_new_tokens)
                stream.finish("length")
