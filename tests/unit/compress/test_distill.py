"""Distillation: config, lineage from compactlm's records, the hidden-state map, the objective's parts."""

from __future__ import annotations

import json
import math

import pytest
import torch

from compactlm.compress.checkpoint import load_model
from compactlm.compress.distill import Distillation, HiddenMap, Lineage, capture, check_compatible, lineage
from compactlm.compress.importance import ImportanceConfig, estimate_importance
from compactlm.compress.losses import cross_entropy
from compactlm.compress.operations import prune_checkpoint
from compactlm.compress.prune import PruneTarget, prune
from compactlm.compress.train import Batch, TrainingData, TrainingInterrupted, train
from compactlm.compress.train_config import DistillConfig, TrainConfig
from compactlm.core.errors import CompactLMError
from tests.helpers import cli, random_tokens, small_run, tiny_config, tiny_model

WIDTH_AND_DEPTH = PruneTarget(hidden_size=36, ffn_hidden_size=64, num_layers=2, depth_metric="block-influence")


def _scores(model):
    return estimate_importance(
        model, random_tokens(4, 16, seed=7), ImportanceConfig(removal_loss=False, block_sizes=(1, 2))
    )


def _batch(rows: int = 2, seq_len: int = 16, seed: int = 11) -> Batch:
    return Batch(indices=torch.arange(rows), input_ids=random_tokens(rows, seq_len, seed=seed))


@pytest.fixture(scope="module")
def teacher():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def pruned(teacher):
    """A width- and depth-pruned student of the teacher and its lineage (from the kept indices)."""
    student, _, kept = prune(teacher, _scores(teacher), WIDTH_AND_DEPTH)
    return student, Lineage(layers=kept.layers.tolist(), hidden=kept.hidden)


def _objective(teacher, student, mapping, loss="logit+hidden+embedding", **cfg) -> Distillation:
    return Distillation(
        DistillConfig(loss=loss, **cfg),
        loss,
        teacher=teacher,
        lineage=mapping,
        student_width=student.config.hidden_size,
        teacher_width=teacher.config.hidden_size,
    )


# --- config -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"loss": "kl"}, "--loss must be one of auto, logit"),
        ({"temperature": 0.0}, "--temperature must be positive"),
        ({"hidden_loss": "l1"}, "--hidden-loss must be cosine or mse"),
        ({"hidden_weight": -1.0}, "loss weights must be >= 0"),
        ({"logit_weight": -0.1}, "loss weights must be >= 0"),
    ],
)
def test_distill_config_rejects_impossible_values(kwargs, message):
    with pytest.raises(CompactLMError, match=message):
        DistillConfig(**kwargs)


@pytest.mark.parametrize(
    "student,teacher,expected",
    [
        (32, 32, "logit"),
        (28, 32, "logit"),
        (25, 32, "logit"),
        (24, 32, "logit+hidden+embedding"),  # exactly 0.75x: a deep cut
        (16, 32, "logit+hidden+embedding"),
        (3, 4, "logit+hidden+embedding"),
    ],
)
def test_auto_loss_adds_hidden_and_embedding_losses_only_for_a_deep_cut(student, teacher, expected):
    assert DistillConfig(loss="auto").resolved_loss(student, teacher) == expected


@pytest.mark.parametrize("loss", ["logit", "logit+hidden", "ce"])
def test_an_explicit_loss_is_kept_whatever_the_cut(loss):
    assert DistillConfig(loss=loss).resolved_loss(8, 32) == loss


# --- the hidden-state map ---------------------------------------------------------------------------------------


def test_hidden_map_starts_as_the_selection_matrix_of_the_kept_channels():
    kept = torch.tensor([5, 0, 2, 3])
    hidden_map = HiddenMap(4, 6, kept)
    x = torch.randn(2, 3, 4)
    y = hidden_map(x)
    assert y.shape == (2, 3, 6)
    for i, channel in enumerate(kept.tolist()):
        assert torch.equal(y[..., channel], x[..., i])
    assert torch.equal(y[..., [1, 4]], torch.zeros(2, 3, 2))
    assert hidden_map.proj.weight.sum().item() == 4.0


def test_the_mapped_student_embedding_is_the_teachers_at_the_kept_channels(teacher, pruned):
    student, mapping = pruned
    hidden_map = HiddenMap(student.config.hidden_size, teacher.config.hidden_size, mapping.hidden)
    ids = random_tokens(2, 8, seed=1)
    with torch.no_grad(), capture(student, [], True) as s_out, capture(teacher, [], True) as t_out:
        student(input_ids=ids, use_cache=False)
        teacher(input_ids=ids, use_cache=False)
        mapped = hidden_map(s_out["emb"])
    assert torch.equal(mapped[..., mapping.hidden], t_out["emb"][..., mapping.hidden])
    dropped = sorted(set(range(48)) - set(mapping.hidden.tolist()))
    assert len(dropped) == 12 and torch.equal(mapped[..., dropped], torch.zeros(2, 8, 12))


def test_capture_records_the_chosen_layers_and_removes_its_hooks():
    model = tiny_model("llama")  # its own: transformers adds hooks of its own for output_hidden_states
    ids = random_tokens(1, 8, seed=2)
    with torch.no_grad(), capture(model, [0, 3], True) as out:
        model(input_ids=ids, use_cache=False)
    assert set(out) == {0, 3, "emb"} and out[3].shape == (1, 8, 48)
    assert not model.model.embed_tokens._forward_hooks
    assert all(not layer._forward_hooks for layer in model.model.layers)
    with torch.no_grad():
        states = model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
    torch.testing.assert_close(out["emb"], states[0])
    torch.testing.assert_close(out[0], states[1])  # hidden_states[i + 1] is layer i's output


# --- the objective ----------------------------------------------------------------------------------------------


def test_a_student_equal_to_its_teacher_has_zero_distillation_losses(teacher):
    student, record, _ = prune(teacher, _scores(teacher), PruneTarget())  # removes nothing
    assert record["to_shape"] == record["from_shape"]
    mapping = lineage(None, teacher.config, student.config)
    assert mapping.layers == [0, 1, 2, 3] and mapping.hidden is None
    objective = _objective(teacher, student, mapping)
    assert objective.modules() == []  # same width: no map to learn
    total, parts = objective.loss(student, _batch())
    assert set(parts) == {"kd", "hidden", "embedding"}
    assert parts["kd"] == pytest.approx(0.0, abs=1e-6)
    assert parts["hidden"] == pytest.approx(0.0, abs=1e-6)
    assert parts["embedding"] == pytest.approx(0.0, abs=1e-6)
    assert total.item() == pytest.approx(0.0, abs=1e-5)


def test_a_pruned_students_loss_parts_are_finite_weighted_and_summed(teacher, pruned):
    student, mapping = pruned
    objective = _objective(teacher, student, mapping, logit_weight=0.5, hidden_weight=2.0, embedding_weight=3.0)
    assert len(objective.modules()) == 1 and objective.modules()[0].proj.weight.shape == (48, 36)
    total, parts = objective.loss(student, _batch())
    assert all(torch.isfinite(torch.tensor(v)) for v in parts.values())
    assert parts["kd"] > 0 and 0 < parts["hidden"] < 2 and 0 <= parts["embedding"] < 2
    expected = 0.5 * parts["kd"] + 2.0 * parts["hidden"] + 3.0 * parts["embedding"]
    assert total.item() == pytest.approx(expected, rel=1e-5)
    logit_only = _objective(teacher, student, mapping, loss="logit")
    total_logit, logit_parts = logit_only.loss(student, _batch())
    assert set(logit_parts) == {"kd"} and logit_parts["kd"] == pytest.approx(parts["kd"], rel=1e-6)
    assert logit_only.modules() == []


def test_the_hidden_loss_compares_each_student_layer_with_the_teacher_layer_it_came_from(teacher, pruned):
    student, mapping = pruned
    objective = _objective(teacher, student, mapping, loss="logit+hidden")
    _, right = objective.loss(student, _batch())
    shuffled = Lineage(layers=list(reversed(mapping.layers)), hidden=mapping.hidden)
    _, wrong = _objective(teacher, student, shuffled, loss="logit+hidden").loss(student, _batch())
    assert right["hidden"] < wrong["hidden"]


def test_distilling_a_pruned_student_with_logit_and_hidden_losses_lowers_the_loss(teacher, pruned, tmp_path):
    student = prune(teacher, _scores(teacher), WIDTH_AND_DEPTH)[0]  # a fresh copy: training changes it
    _, mapping = pruned
    objective = _objective(teacher, student, mapping, loss="logit+hidden")
    data = TrainingData(random_tokens(4, 16, seed=4), seed=0)
    probe = Batch(torch.arange(4), data.sequences)
    with torch.no_grad():
        before, before_parts = objective.loss(student, probe)
    map_before = objective.hidden_map.proj.weight.detach().clone()
    cfg = TrainConfig(steps=10, batch_size=4, lr=3e-3, min_lr=1e-4, warmup_steps=1, save_every=0)
    result = train(student, objective, data, cfg, tmp_path)
    with torch.no_grad():
        after, after_parts = objective.loss(student, probe)
    assert after.item() < 0.8 * before.item(), (before_parts, after_parts)
    assert after_parts["kd"] < before_parts["kd"]
    assert not torch.equal(objective.hidden_map.proj.weight, map_before)  # the map is learned too
    assert {"kd", "hidden"} <= set(result.history[-1])
    assert not any(p.requires_grad for p in teacher.parameters())


def test_the_ce_objective_needs_no_teacher():
    student = tiny_model("llama", num_hidden_layers=2)
    objective = Distillation(DistillConfig(loss="ce"), "ce")
    batch = _batch()
    total, parts = objective.loss(student, batch)
    expected = cross_entropy(student(input_ids=batch.input_ids, use_cache=False).logits, batch.input_ids)
    assert total.item() == pytest.approx(expected.item()) and parts == {"ce": pytest.approx(expected.item())}


def test_the_objective_refuses_what_it_cannot_compute(teacher, pruned):
    student, mapping = pruned
    with pytest.raises(CompactLMError, match="need the live teacher"):
        Distillation(DistillConfig(), "logit+hidden", cache=object(), lineage=mapping)
    with pytest.raises(CompactLMError, match="need the live teacher"):
        Distillation(DistillConfig(), "logit+hidden", teacher=teacher, lineage=None)
    with pytest.raises(CompactLMError, match="needs a teacher or a teacher cache"):
        Distillation(DistillConfig(), "logit")


# --- lineage and compatibility ----------------------------------------------------------------------------------


@pytest.fixture
def teacher_on_disk(tiny_dir):
    return load_model(tiny_dir)  # sets model.compactlm_path, which prune_checkpoint reads


def test_a_student_pruned_by_compactlm_maps_onto_the_teacher_layers_it_kept(teacher_on_disk, tmp_path):
    out = tmp_path / "student"
    done = prune_checkpoint(teacher_on_disk, out, WIDTH_AND_DEPTH, scores=_scores(teacher_on_disk))
    student = load_model(out)
    mapping = lineage(out, teacher_on_disk.config, student.config)
    dropped = done["record"]["dropped_layers"]
    assert len(dropped) == 2 and mapping.layers == [i for i in range(4) if i not in dropped]
    from safetensors.torch import load_file

    assert done["record"]["kept_indices"] == "compactlm.kept.0.safetensors"  # numbered by its place in the history
    kept = load_file(out / done["record"]["kept_indices"])
    assert torch.equal(mapping.hidden, kept["hidden"]) and mapping.hidden.shape == (36,)
    # The embedding kept exactly the teacher's columns named by the lineage.
    assert torch.equal(student.model.embed_tokens.weight, teacher_on_disk.model.embed_tokens.weight[:, mapping.hidden])


def test_a_depth_only_student_needs_no_hidden_map(teacher_on_disk, tmp_path):
    out = tmp_path / "student"
    prune_checkpoint(teacher_on_disk, out, PruneTarget(drop_layers=(0, 2)))
    student = load_model(out)
    mapping = lineage(out, teacher_on_disk.config, student.config)
    assert mapping.layers == [1, 3] and mapping.hidden is None
    objective = _objective(teacher_on_disk, student, mapping)
    assert objective.modules() == []
    _, parts = objective.loss(student, _batch())
    assert parts["embedding"] == pytest.approx(0.0, abs=1e-6)  # the embedding was not pruned


def test_a_student_of_another_shape_without_a_record_is_refused(teacher, pruned, tmp_path):
    student, _ = pruned
    folder = tmp_path / "foreign"
    student.save_pretrained(folder)
    with pytest.raises(CompactLMError, match="has no prune record.*use --loss logit"):
        lineage(folder, teacher.config, student.config)
    with pytest.raises(CompactLMError, match="--loss logit"):
        lineage(None, teacher.config, student.config)


def test_a_student_pruned_from_another_parent_shape_is_refused(teacher_on_disk, tmp_path):
    out = tmp_path / "student"
    prune_checkpoint(teacher_on_disk, out, PruneTarget(drop_layers=(1,)))
    other_teacher = tiny_config("llama", num_hidden_layers=5)
    student_config = load_model(out).config
    assert json.loads((out / "compactlm.json").read_text())["history"][-1]["op"] == "prune"
    with pytest.raises(CompactLMError, match="names another parent shape.*--loss logit"):
        lineage(out, other_teacher, student_config)


def test_a_prune_record_written_before_newer_shape_fields_still_maps(teacher_on_disk, tmp_path):
    """Records from before qk_norm_full / norms_per_layer existed lack them: they read as the defaults."""
    out = tmp_path / "student"
    target = PruneTarget(hidden_size=36, drop_layers=(1,))
    prune_checkpoint(teacher_on_disk, out, target, scores=_scores(teacher_on_disk))
    path = out / "compactlm.json"
    record = json.loads(path.read_text())
    for key in ("qk_norm_full", "norms_per_layer"):
        del record["history"][-1]["from_shape"][key]
    path.write_text(json.dumps(record))
    got = lineage(out, teacher_on_disk.config, load_model(out).config)
    assert got.layers == [0, 2, 3] and got.hidden is not None and len(got.hidden) == 36


def test_teacher_and_student_must_share_the_vocabulary_and_tokenizer(tmp_path):
    with pytest.raises(CompactLMError, match="different vocabularies \\(256 vs 128 tokens\\)"):
        check_compatible(tiny_config(), tiny_config(vocab_size=128))
    check_compatible(tiny_config(), tiny_config(hidden_size=36))  # other widths are fine
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "tokenizer.json").write_text('{"model": "a"}')
    (b / "tokenizer.json").write_text('{"model": "b"}')
    with pytest.raises(CompactLMError, match="different tokenizers"):
        check_compatible(tiny_config(), tiny_config(), a, b)
    (b / "tokenizer.json").write_text('{"model": "a"}')
    check_compatible(tiny_config(), tiny_config(), a, b)
    (b / "tokenizer.json").unlink()
    check_compatible(tiny_config(), tiny_config(), a, b)  # only one ships a tokenizer: nothing to compare


# --- the distill job and command --------------------------------------------------------------------------------


def _record(folder) -> dict:
    return json.loads((folder / "compactlm.json").read_text())


def _distill(ckpts, out, *extra):
    models = ["--teacher", ckpts["teacher"], "--student", ckpts["student"]]
    return cli("compress", "distill", *models, "--out", out, *small_run(ckpts["corpus"]), *extra)


def test_distill_writes_the_student_with_its_record(retrain_checkpoints, tmp_path):
    ckpts, out = retrain_checkpoints, tmp_path / "distilled"
    result = _distill(ckpts, out, "--loss", "logit")
    assert result.exit_code == 0, result.output
    record = _record(out)
    assert [op["op"] for op in record["history"]] == ["prune", "distill"]
    step = record["history"][-1]
    assert step["steps"] == 3 and step["loss"] == "logit" and step["teacher"] == str(ckpts["teacher"])
    assert step["tokens"] == 3 * 2 * 16 and step["sequences"] == 6 and step["seq_len"] == 16
    assert [row["step"] for row in step["history"]] == [1, 2, 3] and "kd" in step["history"][0]
    assert step["train"]["steps"] == 3 and step["distill"]["loss"] == "logit" and step["teacher_cache"] is None
    assert step["heldout_loss"] > 0 and step["final_train_loss"] == pytest.approx(step["history"][-1]["loss"], abs=1e-6)
    assert record["parent"] == str(ckpts["student"].resolve())
    assert (out / "tokenizer.json").is_file()
    assert (out / record["history"][0]["kept_indices"]).is_file()  # the lineage travels with the student
    assert not (tmp_path / ".distilled.work").exists()  # the work folder goes once OUT is written
    distilled, student = load_model(out), load_model(ckpts["student"])
    assert distilled.config.num_hidden_layers == 3
    assert not torch.equal(distilled.model.norm.weight, student.model.norm.weight)  # it trained
    assert "done" in result.output and "3 steps" in result.output


def test_auto_loss_on_a_deep_cut_uses_hidden_states_from_the_record(retrain_checkpoints, tmp_path):
    out = tmp_path / "distilled"
    result = _distill(retrain_checkpoints, out, "--loss", "auto")  # 3 of 4 layers = 0.75x: a deep cut
    assert result.exit_code == 0, result.output
    step = _record(out)["history"][-1]
    assert step["loss"] == "logit+hidden+embedding"
    assert {"kd", "hidden", "embedding"} <= set(step["history"][0])


def test_ce_from_scratch_trains_the_student_architecture_without_a_teacher(retrain_checkpoints, tmp_path):
    out = tmp_path / "baseline"
    result = _distill(retrain_checkpoints, out, "--loss", "ce", "--from-scratch")
    assert result.exit_code == 0, result.output
    step = _record(out)["history"][-1]
    assert step["op"] == "train" and step["loss"] == "ce" and step["teacher"] is None and step["from_scratch"]
    assert [row["step"] for row in step["history"]] == [1, 2, 3] and "ce" in step["history"][0]
    assert load_model(out).config.num_hidden_layers == 3


def test_from_scratch_really_reinitializes_the_student(retrain_checkpoints, tmp_path):
    from compactlm.compress.retrain import distill_checkpoint

    ckpts = retrain_checkpoints
    record = distill_checkpoint(
        ckpts["teacher"],
        ckpts["student"],
        tmp_path / "baseline",
        data=ckpts["corpus"],
        train_cfg=TrainConfig(steps=1, seq_len=16, batch_size=2),
        distill_cfg=DistillConfig(loss="ce"),
        from_scratch=True,
        eval_samples=0,
    )
    # A fresh init (std 0.02) predicts a near-uniform distribution over the 256 tokens; the pruned tiny
    # student (weights of std 0.2) does not (its first CE is ~6.5).
    assert record["history"][0]["ce"] == pytest.approx(math.log(256), abs=0.05)


def test_distill_refuses_an_existing_out_before_training(retrain_checkpoints, tmp_path, monkeypatch):
    import compactlm.compress.retrain

    started = []
    monkeypatch.setattr(compactlm.compress.retrain, "train", lambda *a, **k: started.append(a))
    out = tmp_path / "distilled"
    out.mkdir()
    result = _distill(retrain_checkpoints, out, "--loss", "logit")
    assert isinstance(result.exception, CompactLMError) and "already exists" in str(result.exception)
    assert started == [] and not (tmp_path / ".distilled.work").exists()


def test_a_leftover_work_folder_needs_resume_or_overwrite(retrain_checkpoints, tmp_path):
    out, work = tmp_path / "distilled", tmp_path / ".distilled.work"
    (work / "checkpoints").mkdir(parents=True)
    (work / "notes").write_text("mine")
    result = _distill(retrain_checkpoints, out, "--loss", "logit")
    assert isinstance(result.exception, CompactLMError)
    assert "pass --resume to continue it, or --overwrite" in str(result.exception)
    assert (work / "notes").read_text() == "mine" and not out.exists()
    result = _distill(retrain_checkpoints, out, "--loss", "logit", "--overwrite")
    assert result.exit_code == 0, result.output
    assert not work.exists() and _record(out)["history"][-1]["steps"] == 3


def test_an_interrupted_distillation_resumes_from_the_command_line(retrain_checkpoints, tmp_path):
    from compactlm.compress.retrain import distill_checkpoint

    ckpts = retrain_checkpoints
    kwargs = dict(
        data=ckpts["corpus"],
        train_cfg=TrainConfig(steps=3, seq_len=16, batch_size=2, save_every=1),
        distill_cfg=DistillConfig(loss="logit"),
        eval_samples=0,
    )
    distill_checkpoint(ckpts["teacher"], ckpts["student"], tmp_path / "whole", **kwargs)
    with pytest.raises(TrainingInterrupted):
        distill_checkpoint(ckpts["teacher"], ckpts["student"], tmp_path / "parts", stop_after=2, **kwargs)
    assert not (tmp_path / "parts").exists() and (tmp_path / ".parts.work" / "checkpoints").is_dir()
    result = _distill(ckpts, tmp_path / "parts", "--loss", "logit", "--save-every", "1", "--resume")
    assert result.exit_code == 0, result.output
    whole, parts = load_model(tmp_path / "whole"), load_model(tmp_path / "parts")
    for name, value in whole.state_dict().items():
        assert torch.equal(parts.state_dict()[name], value), name
    assert [r["loss"] for r in _record(tmp_path / "parts")["history"][-1]["history"]] == [
        r["loss"] for r in _record(tmp_path / "whole")["history"][-1]["history"]
    ]
    assert not (tmp_path / ".parts.work").exists()


def test_distill_names_what_is_missing(retrain_checkpoints, tmp_path):
    out = tmp_path / "o"
    result = cli("compress", "distill", "--student", retrain_checkpoints["student"], "--out", out, "--steps", 1)
    assert isinstance(result.exception, CompactLMError) and "--teacher is required" in str(result.exception)
    result = _distill(retrain_checkpoints, out, "--tokens", "64")
    assert isinstance(result.exception, CompactLMError)
    assert "give one of --steps and --tokens, not both" in str(result.exception)
    result = cli("compress", "distill", "--teacher", "x", "--student", "y", "--out", out)
    assert isinstance(result.exception, CompactLMError) and "give a training length" in str(result.exception)
    assert not out.exists()


def test_a_distilled_student_keeps_its_lineage(retrain_checkpoints, tmp_path):
    from compactlm.compress.retrain import distill_checkpoint

    ckpts = retrain_checkpoints
    out = tmp_path / "distilled"
    distill_checkpoint(
        ckpts["teacher"],
        ckpts["student"],
        out,
        data=ckpts["corpus"],
        train_cfg=TrainConfig(steps=1, seq_len=16, batch_size=2),
        distill_cfg=DistillConfig(loss="logit"),
        eval_samples=0,
    )
    teacher_config = load_model(ckpts["teacher"]).config
    assert lineage(out, teacher_config, load_model(out).config).layers == [0, 2, 3]
