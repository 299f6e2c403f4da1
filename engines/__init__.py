"""Engine builder: compile a Hugging Face checkpoint into an inference engine and run it through one interface.

    from compactlm.engines import BuildConfig, build_engine, load_engine, Request
    build_engine("smollm2-135m", "engines/smol-fp32", BuildConfig(backend="cpu", precision="fp32"))
    with load_engine("engines/smol-fp32") as engine:
        completions = engine.generate([[1, 2, 3]], max_new_tokens=16)

Backends (engines/registry.py): `cpu` (OpenVINO GenAI, the embedded default), `torch` (transformers generate,
the reference), `trtllm` (TensorRT-LLM's current flow: the HF or ModelOpt unified FP8 checkpoint it loads directly,
with its LLM arguments) and `trtllm-engine` (the legacy trtllm-build flow). Each engine folder carries
engine.json (engines/manifest.py): its source, precision, limits and the versions it was built with.
"""

from compactlm.engines.build import build_engine
from compactlm.engines.config import BuildConfig, Limits
from compactlm.engines.manifest import Manifest, read_manifest
from compactlm.engines.registry import get_backend, list_backends, load_engine
from compactlm.engines.runtime import Capabilities, Completion, Engine, Request, RequestStream, Sampling

__all__ = [
    "BuildConfig",
    "Capabilities",
    "Completion",
    "Engine",
    "Limits",
    "Manifest",
    "Request",
    "RequestStream",
    "Sampling",
    "build_engine",
    "get_backend",
    "list_backends",
    "load_engine",
    "read_manifest",
]
