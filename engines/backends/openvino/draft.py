"""Speculative decoding on the cpu engine: a smaller model with the same vocabulary (a compactlm student of the
engine's own model is the natural one) proposes `tokens` tokens a step, and the engine's model checks them all in
one pass, keeping the longest run it agrees with plus one token of its own.

OpenVINO GenAI's `ContinuousBatchingPipeline` takes the draft as its `draft_model` property and the count per
request (`GenerationConfig.num_assistant_tokens`); requests keep joining and leaving between steps as without one.
The draft either lives in the engine folder (`compactlm engines build TEACHER OUT --draft STUDENT`: exported beside
the model with the same precision, recorded in engine.json) or is another cpu engine folder named at load time
(`load_engine(TEACHER_ENGINE, draft=STUDENT_ENGINE)`), which is how the benchmark tries several drafts.

Greedy output is the model's own in fp32 (tests: same tokens with and without a draft, whatever the draft). With
bf16 compute (the bf16, int8 and int4 engines) checking k+1 tokens in one pass rounds differently from one token
at a time, so a few greedy tokens may differ, as they do between two batch sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from compactlm.core.errors import CompactLMError

if TYPE_CHECKING:
    from compactlm.engines.config import BuildConfig
    from compactlm.engines.manifest import Manifest

FOLDER = "draft"


@dataclass(frozen=True)
class Draft:
    model_dir: str
    """The draft's OpenVINO IR folder."""
    properties: dict
    """Its runtime properties (precision hints), as its own engine was built with."""
    tokens: int
    """Tokens it proposes per step."""


def _same_vocabulary(target_vocab, draft_vocab, what: str) -> None:
    if target_vocab and draft_vocab and int(target_vocab) != int(draft_vocab):
        raise CompactLMError(
            f"the draft model {what} has a vocabulary of {draft_vocab} tokens, the model {target_vocab}: "
            "a draft must share the model's tokenizer"
        )


def check_draft_checkpoint(model_config, config: BuildConfig):
    """The draft checkpoint of a build, checked before any work: it exists, shares the vocabulary, fits the limits."""
    from compactlm.compress.checkpoint import inspect_checkpoint
    from compactlm.engines.build import check_limits

    draft = inspect_checkpoint(config.draft)
    _same_vocabulary(getattr(model_config, "vocab_size", None), getattr(draft.config, "vocab_size", None), config.draft)
    check_limits(draft.config, config)
    return draft


def build_draft(
    draft_checkpoint, out: Path, weight_format: str, config: BuildConfig, calibration: list[str] | None, fuse: bool
) -> dict:
    """Export the draft into OUT/draft with the engine's weight format (int4: AWQ on `calibration`, its text; `fuse`:
    q/k/v fused as the model's are); the manifest's record of it."""
    from compactlm.engines.backends.openvino.export import export_openvino
    from compactlm.engines.backends.openvino.fuse import fuse_ir
    from compactlm.engines.build import model_summary

    model_dir = out / FOLDER / "model"
    export_openvino(draft_checkpoint.path, model_dir, weight_format, draft_checkpoint.config, calibration)
    fused = fuse_ir(model_dir / "openvino_model.xml")["groups"] if fuse else 0
    return {
        "folder": FOLDER,
        "source": {"path": str(draft_checkpoint.path.resolve()), "sha256": draft_checkpoint.sha256()},
        "model": model_summary(draft_checkpoint.config),
        "num_assistant_tokens": config.draft_tokens,
        "fused_qkv_layers": fused,
    }


def resolve_draft(
    path: Path, manifest: Manifest, properties: dict, draft: str | Path | None, tokens: int | None
) -> Draft | None:
    """The draft an engine runs with: `draft` (another cpu engine folder) if given, else the one built into the
    folder; `tokens=0` runs without one."""
    from compactlm.engines.config import DEFAULT_DRAFT_TOKENS, check_draft_tokens

    if tokens == 0:
        return None
    if tokens is not None:
        check_draft_tokens(tokens)
    built = manifest.backend_info.get("draft")
    if draft is not None:
        from compactlm.engines.manifest import read_manifest

        other = read_manifest(draft)
        if other.backend != "cpu":
            raise CompactLMError(f"a draft must be a cpu engine folder; {draft} is a {other.backend} engine")
        _same_vocabulary(manifest.model.get("vocab_size"), other.model.get("vocab_size"), str(draft))
        props = other.backend_info.get("properties", {})
        return Draft(str(Path(draft) / "model"), dict(props), tokens or DEFAULT_DRAFT_TOKENS)
    if built:
        model_dir = str(path / built["folder"] / "model")
        return Draft(model_dir, dict(properties), tokens or int(built["num_assistant_tokens"]))
    if tokens is not None:
        raise CompactLMError(f"{path} has no draft model: build it with --draft, or name a draft engine folder")
    return None
