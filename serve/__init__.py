"""compactlm.serve: an engine behind a real Triton Inference Server (streaming and batched models, KServe v2 over
HTTP and gRPC) with an OpenAI-compatible route, sharing one request layer; and the Triton model repository of a
TensorRT-LLM engine.

    from compactlm.serve import ServeConfig, serve
    serve("runs/engines/smol-fp32", ServeConfig(http_port=8000))

Names are imported lazily: PyTriton and tritonclient load only when a server starts.
"""

from __future__ import annotations

from compactlm.core.exports import lazy_exports

_EXPORTS = {
    "ServeConfig": "compactlm.serve.server",
    "serve": "compactlm.serve.server",
    "GenerationService": "compactlm.serve.requests",
    "TritonRepoConfig": "compactlm.serve.triton_repo",
    "write_triton_repo": "compactlm.serve.triton_repo",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
