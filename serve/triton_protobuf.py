"""Triton model configs as protobuf: tritonclient's ModelConfig, the helpers that fill it, the parser that reads a
config.pbtxt back, and what a written repository is (both TensorRT-LLM repositories use them)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from compactlm.core.errors import CompactLMError


@dataclass
class TritonRepo:
    path: Path
    models: list[str]
    command: list[str]
    """The tritonserver command line that serves the repository (mpirun with one rank per GPU when tp > 1)."""
    notices: list[str] = field(default_factory=list)

    @property
    def command_line(self) -> str:
        return shlex.join(self.command)


def protobufs():
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise CompactLMError(
            f"writing Triton configs needs tritonclient's protobufs: pip install 'tritonclient[grpc]==2.73.0' ({exc})"
        ) from exc
    return model_config_pb2, text_format


def make_tensor(pb, kind, name: str, dtype: str, dims: list[int], optional=False, ragged=False, scalar=False):
    tensor = kind(name=name, data_type=getattr(pb, f"TYPE_{dtype}"), dims=dims)
    if optional:
        tensor.optional = True
    if ragged:
        tensor.allow_ragged_batch = True
    if scalar:  # the backend takes [1] as a scalar per request
        tensor.reshape.SetInParent()
    return tensor


def add_inputs(pb, config, specs) -> None:
    for spec in specs:
        config.input.append(make_tensor(pb, pb.ModelInput, *spec[:3], **spec[3] if len(spec) > 3 else {}))


def add_outputs(pb, config, specs) -> None:
    for name, dtype, dims in specs:
        config.output.append(make_tensor(pb, pb.ModelOutput, name, dtype, dims))


def set_params(config, values: dict) -> None:
    for key, value in values.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        config.parameters[key].string_value = text


def cpu_instances(pb, config, count: int = 1) -> None:
    config.instance_group.append(pb.ModelInstanceGroup(count=count, kind=pb.ModelInstanceGroup.KIND_CPU))


def parse_config(text: str, origin: str = "config.pbtxt"):
    """A config.pbtxt as Triton's ModelConfig; CompactLMError if protobuf's text parser refuses it."""
    pb, text_format = protobufs()
    try:
        return text_format.Parse(text, pb.ModelConfig())
    except text_format.ParseError as exc:
        raise CompactLMError(f"{origin} is not a valid Triton model config: {exc}") from exc
