"""Knowledge distillation objectives (Minitron step 5): logits, intermediate hidden states, embeddings.

A student pruned by compactlm knows where it came from: `compactlm.kept.N.safetensors` names, in the parent's
numbering, the layers and hidden channels it kept. That gives the default layer mapping (student layer j <->
the teacher layer it was cut from) and the initial value of the learned linear map from the student's hidden
width to the teacher's (the selection matrix: an exact embedding of the kept channels), so a hidden-state loss
starts from where pruning left off.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compactlm.compress.arch import decoder_layers, recorded_shape, shape_of
from compactlm.compress.losses import cross_entropy, hidden_state, kd_logits, kd_topk
from compactlm.compress.record import read_record
from compactlm.compress.train import Batch
from compactlm.compress.train_config import DistillConfig
from compactlm.core.errors import CompactLMError


@dataclass
class Lineage:
    """How a student maps onto its teacher."""

    layers: list[int]
    """Teacher layer of each student layer."""
    hidden: torch.Tensor | None
    """Teacher channel of each student hidden channel (None: same width, identity)."""


def tokenizer_fingerprint(path: str | Path) -> str | None:
    file = Path(path) / "tokenizer.json"
    return hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else None


def check_compatible(teacher_config, student_config, teacher_path=None, student_path=None) -> None:
    """Teacher and student must share the vocabulary (and tokenizer, when both ship one)."""
    if teacher_config.vocab_size != student_config.vocab_size:
        raise CompactLMError(
            f"teacher and student have different vocabularies ({teacher_config.vocab_size} vs "
            f"{student_config.vocab_size} tokens): distillation compares their distributions token by token"
        )
    if teacher_path and student_path:
        t, s = tokenizer_fingerprint(teacher_path), tokenizer_fingerprint(student_path)
        if t and s and t != s:
            raise CompactLMError("teacher and student ship different tokenizers (tokenizer.json differs)")


def lineage(student_path, teacher_config, student_config) -> Lineage:
    """Where each student layer and channel came from; a clear error when the student is not the teacher's."""
    teacher, student = shape_of(teacher_config), shape_of(student_config)
    if (teacher.num_layers, teacher.hidden_size) == (student.num_layers, student.hidden_size):
        return Lineage(layers=list(range(student.num_layers)), hidden=None)
    record = read_record(student_path) if student_path else None
    prunes = [op for op in (record or {}).get("history", []) if op.get("op") == "prune"]
    if not prunes or recorded_shape(prunes[-1]["from_shape"]) != teacher:
        raise CompactLMError(
            "a hidden-state loss needs to know which teacher layer and channel each student layer and channel "
            "came from, but the student was not pruned by compactlm from a model of the teacher's shape "
            f"(its compactlm.json {'has no prune record' if not prunes else 'names another parent shape'}); "
            "use --loss logit, or prune the student from this teacher"
        )
    from safetensors.torch import load_file

    kept_file = Path(student_path) / prunes[-1].get("kept_indices", "compactlm.kept.safetensors")
    if not kept_file.is_file():
        raise CompactLMError(
            f"{kept_file.name}, which records where the student's layers and channels came from, is missing from "
            f"{student_path}: use --loss logit, or re-create the student with `compress prune`"
        )
    kept = load_file(str(kept_file))
    hidden = kept["hidden"] if student.hidden_size != teacher.hidden_size else None
    return Lineage(layers=kept["layers"].tolist(), hidden=hidden)


class HiddenMap(nn.Module):
    """Learned linear map from the student's hidden width to the teacher's, initialized to the selection matrix."""

    def __init__(self, student_width: int, teacher_width: int, kept: torch.Tensor):
        super().__init__()
        self.proj = nn.Linear(student_width, teacher_width, bias=False)
        with torch.no_grad():
            self.proj.weight.zero_()
            self.proj.weight[kept, torch.arange(student_width)] = 1.0

    def forward(self, x):
        return self.proj(x)


@contextlib.contextmanager
def capture(model, layer_ids: list[int], embeddings: bool):
    """Record the raw outputs of the given decoder layers (and of the embedding) during a forward."""
    out: dict = {}
    base = model.module if hasattr(model, "module") else model
    layers = decoder_layers(base)
    handles = [
        layers[i].register_forward_hook(lambda _m, _a, o, i=i: out.__setitem__(i, o[0] if isinstance(o, tuple) else o))
        for i in layer_ids
    ]
    if embeddings:
        handles.append(base.model.embed_tokens.register_forward_hook(lambda _m, _a, o: out.__setitem__("emb", o)))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


class Distillation:
    """The distillation objective: KD on logits (live teacher or cached top-k), plus hidden/embedding losses."""

    def __init__(
        self,
        cfg: DistillConfig,
        loss: str,
        *,
        teacher=None,
        cache=None,
        lineage: Lineage | None = None,
        student_width: int | None = None,
        teacher_width: int | None = None,
    ):
        self.cfg, self.name = cfg, loss
        self.teacher, self.cache, self.map_layers = teacher, cache, lineage
        self.use_hidden = "hidden" in loss
        self.use_embedding = "embedding" in loss
        if (self.use_hidden or self.use_embedding) and (teacher is None or lineage is None):
            raise CompactLMError("hidden-state and embedding losses need the live teacher (not a logit cache)")
        if teacher is None and cache is None and loss != "ce":
            raise CompactLMError("distillation needs a teacher or a teacher cache")
        self.hidden_map = None
        if lineage is not None and lineage.hidden is not None and (self.use_hidden or self.use_embedding):
            self.hidden_map = HiddenMap(student_width, teacher_width, lineage.hidden)
        if teacher is not None:
            teacher.eval().requires_grad_(False)

    def modules(self) -> list[nn.Module]:
        return [self.hidden_map] if self.hidden_map is not None else []

    def _mapped(self, x):
        return self.hidden_map(x) if self.hidden_map is not None else x

    def loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        ids = batch.input_ids
        if self.name == "ce":
            loss = cross_entropy(model(input_ids=ids, use_cache=False).logits, ids)
            return loss, {"ce": loss.item()}
        student_layers = list(range(len(self.map_layers.layers))) if self.use_hidden else []
        with capture(model, student_layers, self.use_embedding) as s_out:
            logits = model(input_ids=ids, use_cache=False).logits
        parts: dict[str, float] = {}
        if self.teacher is not None:
            teacher_layers = self.map_layers.layers if self.use_hidden else []
            with torch.no_grad(), capture(self.teacher, teacher_layers, self.use_embedding) as t_out:
                t_logits = self.teacher(input_ids=ids, use_cache=False).logits
            kd = kd_logits(logits, t_logits, self.cfg.temperature)
        else:
            values, indices = self.cache.lookup(batch.indices)
            kd = kd_topk(logits, values.to(logits.device), indices.to(logits.device), self.cfg.temperature)
        parts["kd"] = kd.item()
        total = self.cfg.logit_weight * kd
        if self.use_hidden:
            terms = [
                hidden_state(self._mapped(s_out[j]), t_out[t], self.cfg.hidden_loss)
                for j, t in enumerate(self.map_layers.layers)
            ]
            hidden = torch.stack(terms).mean()
            parts["hidden"] = hidden.item()
            total = total + self.cfg.hidden_weight * hidden
        if self.use_embedding:
            emb = hidden_state(self._mapped(s_out["emb"]), t_out["emb"], self.cfg.hidden_loss)
            parts["embedding"] = emb.item()
            total = total + self.cfg.embedding_weight * emb
        return total, parts
