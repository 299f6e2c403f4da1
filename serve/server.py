"""`compactlm serve`: one engine behind a real Triton Inference Server (the one PyTriton bundles; HTTP, gRPC,
metrics, health) and an OpenAI-compatible route, until SIGINT or SIGTERM.

    with Server("engines/smol", ServeConfig(http_port=8000)) as server:
        ...  # tritonclient on 127.0.0.1:8000/8001, OpenAI on :8080
    serve("engines/smol", ServeConfig())  # blocks until a signal; returns the summary line

Everything binds to 127.0.0.1 unless `host` says otherwise. PyTriton is imported lazily: without it,
a CompactLMError says how to install it.
"""

from __future__ import annotations

import logging
import os
import signal
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from compactlm.core.errors import CompactLMError

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    """Address every endpoint binds to; 0.0.0.0 exposes the server to the network."""
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    """Triton's Prometheus metrics (GET /metrics)."""
    openai_port: int | None = 8080
    """The OpenAI-compatible route; None turns it off."""
    max_batch_size: int | None = None
    """Largest batch Triton's dynamic batcher forms for `compactlm_full`; default and maximum: the engine's."""
    max_queue_delay_us: int = 2000
    """How long the dynamic batcher waits to fill a batch."""
    stream_instances: int | None = None
    """Instances of the streaming model (each a Python-backend process that carries responses); default one per
    8 sequences of the engine's max_batch_size."""
    model_name: str | None = None
    """The name the OpenAI route serves (default: the engine folder's name)."""
    log_file: Path | None = None
    """Where tritonserver writes its log (default: a file in a fresh temporary folder)."""
    drain_s: float = 10.0
    """On stop: how long requests in flight get to finish."""
    triton: bool = True
    """False serves the OpenAI front alone (no tritonserver: seconds to start, no PyTriton needed)."""
    max_queue: int | None = None
    """OpenAI front: engine requests in flight beyond which a request gets 429 (default 16x max_batch_size, at
    least 256)."""
    body_timeout_s: float = 30.0
    """OpenAI front: a request body not complete this long after its headers gets 408."""
    recycle: bool = True
    """The cpu engine's pipeline runs in a worker process that is replaced when idle after it has grown past its
    bound (model + KV cache + 256 MB): OpenVINO GenAI's pipeline keeps memory for every request it served."""
    draft_tokens: int | None = None
    """cpu engines built with a draft (`engines build --draft`): tokens it proposes per step; 0 serves the model
    alone; None: as built."""
    max_num_tokens: int | None = None
    """cpu engines: the step budget (prompt and decode tokens in one step) to serve with instead of the built one;
    smaller gives earlier first tokens when requests arrive together (README, "Serving"). None: as built."""

    def __post_init__(self):
        ports = [self.http_port, self.grpc_port, self.metrics_port] + (
            [self.openai_port] if self.openai_port is not None else []
        )
        for port in ports:
            if not isinstance(port, int) or not 0 < port < 65536:
                raise CompactLMError(f"ports must be integers in 1-65535, got {port!r}")
        if len(set(ports)) != len(ports):
            raise CompactLMError(f"the ports must differ, got {ports}")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise CompactLMError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_queue_delay_us < 0:
            raise CompactLMError("max_queue_delay_us must be >= 0")
        if self.stream_instances is not None and self.stream_instances < 1:
            raise CompactLMError(f"stream_instances must be at least 1, got {self.stream_instances}")
        if not self.triton and self.openai_port is None:
            raise CompactLMError("nothing to serve: the OpenAI front is off and so is Triton")
        if self.max_queue is not None and self.max_queue < 1:
            raise CompactLMError(f"max_queue must be at least 1, got {self.max_queue}")
        if not self.body_timeout_s > 0:
            raise CompactLMError(f"body_timeout_s must be > 0, got {self.body_timeout_s}")
        if self.max_num_tokens is not None and (
            not isinstance(self.max_num_tokens, int) or isinstance(self.max_num_tokens, bool) or self.max_num_tokens < 1
        ):
            raise CompactLMError(f"max_num_tokens must be a positive integer, got {self.max_num_tokens!r}")
        if self.draft_tokens not in (None, 0):
            from compactlm.engines.config import check_draft_tokens

            check_draft_tokens(self.draft_tokens)


def python_libdir() -> str:
    """The folder of libpython: PyTriton's Python-backend stub links it (ENVIRONMENT.md)."""
    return sysconfig.get_config_var("LIBDIR") or ""


def ensure_library_path() -> None:
    """Put libpython's folder on LD_LIBRARY_PATH for the tritonserver that PyTriton starts from this process.

    Without it the stub loads another libpython and fails with "'_thread.RLock' object has no attribute
    '_recursion_count'". PyTriton copies os.environ when it starts tritonserver, so setting it here suffices."""
    libdir = python_libdir()
    current = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    if libdir and libdir not in current:
        os.environ["LD_LIBRARY_PATH"] = ":".join([libdir] + current)


def _import_pytriton():
    try:
        from pytriton.triton import Triton, TritonConfig
    except ImportError as exc:
        raise CompactLMError(
            f"serving needs PyTriton (it bundles the Triton server): pip install nvidia-pytriton==0.7.0 ({exc})"
        ) from exc
    return Triton, TritonConfig


HANDSHAKE_RACE = "get_config_from_handshake_server"
"""In the error of a model instance that lost PyTriton's handshake race (see Server.start)."""


class Server:
    """An engine served by Triton (via PyTriton) and the OpenAI route; `start()`, then `stop()` -> summary."""

    def __init__(self, engine_dir: str | os.PathLike, config: ServeConfig | None = None):
        self.engine_dir = Path(engine_dir).expanduser()
        self.config = config or ServeConfig()
        self.engine = self.service = self.models = self.route = self.triton = None
        self.log_file: Path | None = None
        self._children: list = []

    def start(self) -> Server:
        """Load the engine, bind the models, start Triton and the OpenAI route; returns when all are ready.

        Started once more if Triton failed to load a model instance in PyTriton's handshake race: with several
        instances of a model, the others ask the first for its config over a Unix socket that can exist before
        it listens ("Connection refused"); nothing of ours is wrong then, and a second start goes through.
        """
        try:
            return self._start()
        except Exception as exc:
            if HANDSHAKE_RACE not in str(exc):
                raise
            logging.getLogger(__name__).warning("Triton failed to load a model instance (%s); starting again", exc)
            return self._start()

    def _start(self) -> Server:
        from compactlm.engines.registry import load_engine
        from compactlm.serve.requests import GenerationService
        from compactlm.serve.triton_models import TritonModels

        cfg = self.config
        Triton, TritonConfig = _import_pytriton() if cfg.triton else (None, None)
        if cfg.max_num_tokens is not None:
            from compactlm.engines.manifest import read_manifest
            from compactlm.engines.registry import get_backend

            backend = read_manifest(self.engine_dir).backend
            if "max_num_tokens" not in get_backend(backend).load_options:
                raise CompactLMError(
                    f"--max-num-tokens sets a cpu engine's step budget at load; a {backend} engine takes none at load "
                    "(a trtllm engine's is set when it is built: engines build --max-num-tokens)"
                )
        self.engine = load_engine(
            self.engine_dir, recycle=cfg.recycle, draft_tokens=cfg.draft_tokens, max_num_tokens=cfg.max_num_tokens
        )
        limit = self.engine.limits.max_batch_size
        if cfg.max_batch_size is not None and cfg.max_batch_size > limit:
            raise CompactLMError(
                f"--max-batch-size {cfg.max_batch_size} exceeds the engine's max_batch_size {limit}; "
                "rebuild the engine with a larger --max-batch-size"
            )
        try:
            name = cfg.model_name or self.engine_dir.resolve().name
            self.service = GenerationService(self.engine, name)
            if cfg.triton:
                instances = cfg.stream_instances or max(1, -(-limit // 8))
                self.models = TritonModels(self.service, cfg.max_batch_size or limit, cfg.max_queue_delay_us, instances)
            if cfg.openai_port is not None:  # bind first: a taken port fails before Triton starts
                from compactlm.serve.openai_api.app import FrontLimits
                from compactlm.serve.openai_api.route import OpenAIRoute

                limits = FrontLimits(max_queue=cfg.max_queue, body_timeout_s=cfg.body_timeout_s)
                self.route = OpenAIRoute(self.service, cfg.host, cfg.openai_port, name, limits)
            if not cfg.triton:
                self.route.start()
                return self
            self.log_file = cfg.log_file or Path(tempfile.mkdtemp(prefix="compactlm-serve-")) / "tritonserver.log"
            ensure_library_path()
            self.triton = Triton(
                config=TritonConfig(
                    http_address=cfg.host,
                    http_port=cfg.http_port,
                    grpc_address=cfg.host,
                    grpc_port=cfg.grpc_port,
                    metrics_address=cfg.host,
                    metrics_port=cfg.metrics_port,
                    allow_metrics=True,
                    allow_cpu_metrics=True,
                    log_file=self.log_file,
                    exit_timeout_secs=max(1, int(cfg.drain_s)),
                )
            )
            self.models.bind(self.triton)
            before = {p.pid for p in _children()}
            self.triton.run()  # returns when the models are loaded and ready
            self._children = [p for p in _children() if p.pid not in before]
            if self.route is not None:
                self.route.start()
        except BaseException as exc:
            self.stop()
            if isinstance(exc, OSError) and exc.errno == 98:  # EADDRINUSE from the OpenAI route
                raise CompactLMError(f"port {cfg.openai_port} on {cfg.host} is taken: choose --openai-port") from exc
            raise
        return self

    @property
    def alive(self) -> bool:
        if not self.config.triton:
            return self.route is not None
        return self.triton is not None and self.triton.is_alive()

    def endpoints(self) -> dict[str, str]:
        cfg = self.config
        urls = {}
        if cfg.triton:
            urls = {
                "triton http": f"http://{cfg.host}:{cfg.http_port}",
                "triton grpc": f"{cfg.host}:{cfg.grpc_port}",
                "metrics": f"http://{cfg.host}:{cfg.metrics_port}/metrics",
            }
        if self.route is not None:
            urls["openai"] = f"http://{cfg.host}:{self.route.port}/v1"
            urls["openai metrics"] = f"http://{cfg.host}:{self.route.port}/metrics"
        return urls

    def stop(self, wait_children_s: float = 30.0) -> str:
        """Stop the OpenAI route, then Triton (in-flight requests get `drain_s`), then the engine; wait for
        tritonserver's processes to go (they linger ~15 s), ending the ones still there. Returns the summary."""
        if self.route is not None:
            self.route.stop(self.config.drain_s)
            self.route = None
        if self.triton is not None:
            try:
                self.triton.stop()
            finally:
                self.triton = None
        _reap(self._children, wait_children_s)
        self._children = []
        if self.models is not None:
            self.models.close()
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        return self.service.stats.summary() if self.service is not None else "not started"

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _children() -> list:
    """This process's child processes (tritonserver and its Python-backend stubs), to wait for at stop."""
    try:
        import psutil
    except ImportError:
        return []
    return psutil.Process().children(recursive=True)


def _reap(processes: list, timeout: float) -> None:
    if not processes:
        return
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for proc in alive:  # our own children that ignored SIGTERM for `timeout` seconds
        LOG.warning("ending lingering process %s (%s)", proc.pid, proc.name())
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def serve(engine_dir: str | os.PathLike, config: ServeConfig | None = None, on_ready=None) -> str:
    """Serve until SIGINT or SIGTERM (or until tritonserver dies); returns the summary line.

    `on_ready(server)` is called once everything answers (the CLI prints the endpoints there)."""
    stop = threading.Event()
    received: list[int] = []

    def handle(signum, frame) -> None:
        received.append(signum)
        stop.set()

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    server = Server(engine_dir, config)
    try:
        server.start()
        if on_ready is not None:
            on_ready(server)
        while not stop.wait(1.0):
            if not server.alive:
                raise CompactLMError(f"tritonserver stopped by itself; its log: {server.log_file}")
    finally:
        started = time.perf_counter()
        summary = server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    why = signal.Signals(received[0]).name if received else "tritonserver exit"
    return f"stopped on {why} in {time.perf_counter() - started:.1f} s; {summary}"
