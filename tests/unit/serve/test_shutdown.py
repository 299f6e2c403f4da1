"""`compactlm serve` in a child process stops cleanly on SIGTERM and on SIGINT: exit status 0, a summary line,
tritonserver and its Python-backend stubs gone, the ports free again. The child starts without LD_LIBRARY_PATH:
the server must set it itself."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import psutil
import pytest

from tests.helpers import HOST, free_ports, openai_stream, tiny_engine, wait_ready

pytest.importorskip("pytriton", reason="serving needs nvidia-pytriton (a dependency: pip install -e .)")


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return tiny_engine(tmp_path_factory.mktemp("serve-signal"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_server_cleanly(engine_dir, sig):
    http, grpc, metrics, openai = ports = free_ports(4)
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    command = [sys.executable, "-m", "compactlm", "serve", str(engine_dir), "--http-port", str(http)]
    command += ["--grpc-port", str(grpc), "--metrics-port", str(metrics), "--openai-port", str(openai)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    children: list[psutil.Process] = []
    try:
        wait_ready(http, openai, process=proc)
        assert len(openai_stream(openai, {"prompt": [5, 6, 7], "max_tokens": 8, "ignore_eos": True})[0]) == 8
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("tritonserver" in c.name() for c in children)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, out[-2000:]
        assert f"stopped on {sig.name}" in out and "openai: 1 requests, 8 tokens" in out, out[-2000:]
        _, alive = psutil.wait_procs(children, timeout=1)
        assert not alive, f"left behind: {alive}"
        for port in ports:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((HOST, port))  # free again
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for child in children:
            if child.is_running():
                child.kill()
