"""A closed cpu engine must not make the next signal fatal (openvino-genai 2026.4 segfaults on any signal once a
pipeline has been destroyed; engines keep theirs until exit). Run in a child process: a crash must not take pytest."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from compactlm.engines.backends.openvino.export import is_ready


@pytest.mark.skipif(not is_ready(), reason="the OpenVINO exporter venv is not set up")
def test_a_signal_after_closing_a_cpu_engine_is_handled(tmp_path):
    from compactlm.engines import BuildConfig, Limits, build_engine
    from tests.helpers import tiny_model

    tiny_model("llama").save_pretrained(tmp_path / "ckpt")
    limits = Limits(max_batch_size=2, max_input_len=16, max_seq_len=32, max_num_tokens=64)
    out = build_engine(tmp_path / "ckpt", tmp_path / "cpu", BuildConfig(limits=limits))
    script = textwrap.dedent(f"""
        import gc, signal, threading, time
        from compactlm.engines import load_engine
        with load_engine({str(out)!r}) as engine:
            assert len(engine.generate([[1, 2, 3]], 4, ignore_eos=True)[0].tokens) == 4
        del engine
        gc.collect()
        got = []
        signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
        time.sleep(0.05)
        print("handled", len(got))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-500:]}"
    assert "handled 1" in result.stdout
