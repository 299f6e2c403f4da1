"""The OpenAI front on uvicorn, in a background thread with its own event loop: `start()` returns once it
listens, `stop()` drains the requests in flight, then closes.

uvloop and httptools are used where installed (they are dependencies); the socket is bound here, so a taken port
is an OSError before anything starts and port 0 picks a free one (`route.port` tells which).
"""

from __future__ import annotations

import logging
import socket
import threading
import time

from compactlm.core.errors import CompactLMError
from compactlm.serve.openai_api.app import FrontLimits, make_app
from compactlm.serve.requests import GenerationService


def _import_uvicorn():
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise CompactLMError(f"the OpenAI front needs fastapi and uvicorn ({exc}): pip install -e .") from exc
    return uvicorn


def _available(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


class OpenAIRoute:
    """The OpenAI-compatible HTTP front of one engine."""

    def __init__(
        self,
        service: GenerationService,
        host: str,
        port: int,
        model: str,
        limits: FrontLimits | None = None,
    ):
        uvicorn = _import_uvicorn()
        self.service, self.model = service, model
        self.app = make_app(service, model, limits)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError:
            self._socket.close()
            raise
        self._socket.listen(2048)
        config = uvicorn.Config(
            self.app,
            loop="uvloop" if _available("uvloop") else "asyncio",
            http="httptools" if _available("httptools") else "h11",
            access_log=False,
            log_level="warning",
            lifespan="off",
            timeout_keep_alive=30,
            timeout_graceful_shutdown=10,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)

    @property
    def port(self) -> int:
        return self._socket.getsockname()[1]

    def start(self, timeout: float = 30.0) -> None:
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="openai-front", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise CompactLMError("the OpenAI front stopped while starting (see the log above)")
            if time.monotonic() > deadline:
                raise CompactLMError(f"the OpenAI front did not start within {timeout:g} s")
            time.sleep(0.01)

    def stop(self, drain_s: float = 10.0) -> None:
        """Stop accepting, give requests in flight `drain_s`, close."""
        if self._thread is not None:
            self._server.config.timeout_graceful_shutdown = max(1, int(drain_s))
            self._server.should_exit = True
            self._thread.join(timeout=drain_s + 5)
            self._thread = None
        self._socket.close()
