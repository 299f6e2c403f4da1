"""The training loop: config checks, LR schedule, accumulation, data order, checkpoints, resume, NaN, signals."""

from __future__ import annotations

import json
import math
import signal
import threading

import pytest
import torch
from torch import nn

from compactlm.compress.checkpoint import load_model
from compactlm.compress.losses import cross_entropy
from compactlm.compress.train import Batch, CrossEntropy, TrainingData, TrainingInterrupted, lr_lambda, train
from compactlm.compress.train_config import TrainConfig
from compactlm.core.errors import CompactLMError
from tests.helpers import cli, random_tokens, small_run, tiny_model


def _model(seed: int = 0):
    return tiny_model("llama", seed=seed, num_hidden_layers=2)


def _data(rows: int = 8, seq_len: int = 16, seed: int = 0) -> TrainingData:
    return TrainingData(random_tokens(rows, seq_len, seed=3), seed=seed)


def _cfg(**overrides) -> TrainConfig:
    kwargs = dict(steps=6, batch_size=2, lr=1e-3, min_lr=1e-4, warmup_steps=2, save_every=0)
    kwargs.update(overrides)
    return TrainConfig(**kwargs)


def _checkpoints(work) -> list[str]:
    return sorted(p.name for p in (work / "checkpoints").iterdir())


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class ScaledCE:
    """CE through a trained extra parameter: checks that the objective's own modules are trained and saved."""

    name = "scaled-ce"

    def __init__(self):
        self.scale = nn.Linear(1, 1, bias=False)
        nn.init.ones_(self.scale.weight)

    def modules(self) -> list[nn.Module]:
        return [self.scale]

    def loss(self, model, batch: Batch):
        logits = model(input_ids=batch.input_ids, use_cache=False).logits * self.scale.weight[0, 0]
        loss = cross_entropy(logits, batch.input_ids)
        return loss, {"ce": loss.item()}


class Sabotaged:
    """CrossEntropy whose loss turns NaN (or sends SIGTERM) at a given call."""

    name = "ce"

    def __init__(self, at_call: int, action: str):
        self.calls, self.at_call, self.action = 0, at_call, action

    def modules(self) -> list[nn.Module]:
        return []

    def loss(self, model, batch: Batch):
        self.calls += 1
        loss, parts = CrossEntropy().loss(model, batch)
        if self.calls == self.at_call:
            if self.action == "nan":
                loss = loss * math.nan
            else:
                # To the main thread, where Python runs its signal handlers.
                signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
        return loss, parts


# --- config ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"steps": 5, "tokens": 1000}, "give one of --steps and --tokens, not both"),
        ({"steps": 5, "seq_len": 1}, "--seq-len must be at least 2"),
        ({"steps": 0}, "--steps must be at least 1"),
        ({"tokens": 0}, "--tokens must be at least 1"),
        ({"steps": 5, "batch_size": 0}, "--batch-size must be at least 1, not 0"),
        ({"steps": 5, "grad_accum": 0}, "--grad-accum must be at least 1"),
        ({"steps": 5, "lr": 1e-4, "min_lr": 1e-3}, "need 0 < --min-lr"),
        ({"steps": 5, "min_lr": 0.0}, "need 0 < --min-lr"),
        ({"steps": 5, "precision": "fp16"}, "--precision must be one of auto, fp32, bf16"),
        ({"steps": 5, "parallel": "zero3"}, "--parallel must be one of ddp, fsdp"),
        ({"steps": 5, "save_every": -1}, "--save-every must be >= 0"),
    ],
)
def test_train_config_rejects_impossible_values(kwargs, message):
    with pytest.raises(CompactLMError, match=message.replace("(", r"\(")):
        TrainConfig(**kwargs)


def test_a_run_needs_a_length_when_it_starts():
    with pytest.raises(CompactLMError, match="give a training length: --tokens N or --steps N"):
        TrainConfig().total_steps()


def test_total_steps_from_a_token_budget_rounds_up():
    cfg = TrainConfig(tokens=1000, batch_size=4, grad_accum=2)
    assert cfg.global_batch() == 8 and cfg.global_batch(world_size=2) == 16
    assert cfg.total_steps(seq_len=16) == math.ceil(1000 / 128) == 8
    assert cfg.total_steps(seq_len=16, world_size=2) == math.ceil(1000 / 256) == 4
    assert TrainConfig(tokens=1).total_steps(seq_len=16) == 1
    assert TrainConfig(steps=7, batch_size=3).total_steps(seq_len=999, world_size=4) == 7


# --- LR schedule ------------------------------------------------------------------------------------------------


def test_lr_warms_up_linearly_to_the_peak_then_follows_a_cosine_to_exactly_min_lr():
    cfg = TrainConfig(steps=20, lr=1e-3, min_lr=1e-4, warmup_steps=4)
    f = lr_lambda(cfg, 20)
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(4) == pytest.approx(1.0)  # the cosine starts at the peak
    assert f(12) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay: the mean of peak and floor
    assert f(8) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    decay = [f(s) for s in range(4, 21)]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
    assert f(20) * cfg.lr == pytest.approx(cfg.min_lr, rel=1e-12)
    assert f(25) == f(20)  # stays at the floor past the end


def test_default_warmup_is_the_papers_40_or_a_tenth_of_a_short_run():
    assert TrainConfig(steps=1000).warmup(1000) == 40
    assert TrainConfig(steps=100).warmup(100) == 10
    assert TrainConfig(steps=5).warmup(5) == 1
    assert TrainConfig(steps=100, warmup_steps=3).warmup(100) == 3


@pytest.fixture
def used_lrs(monkeypatch) -> list[float]:
    """The lr of every AdamW step, in order, as the optimizer saw it."""
    used: list[float] = []
    original = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    return used


def test_the_optimizer_uses_the_scheduled_lr_at_each_step(tmp_path, used_lrs):
    used = used_lrs
    cfg = _cfg(steps=6, warmup_steps=2)
    train(_model(), CrossEntropy(), _data(), cfg, tmp_path)
    f = lr_lambda(cfg, 6)
    assert used == pytest.approx([cfg.lr * f(s) for s in range(6)])
    assert used[0] == pytest.approx(cfg.lr / 2) and used[1] == pytest.approx(cfg.lr)


def test_each_history_row_reports_the_lr_its_step_used(tmp_path, used_lrs):
    used = used_lrs
    result = train(_model(), CrossEntropy(), _data(), _cfg(steps=4, warmup_steps=2), tmp_path)
    assert [row["lr"] for row in result.history] == pytest.approx(used)


# --- what one step computes -------------------------------------------------------------------------------------


def test_gradient_accumulation_equals_the_same_global_batch(tmp_path):
    big, small = _model(), _model()
    train(big, CrossEntropy(), _data(), _cfg(steps=5, batch_size=4, grad_accum=1), tmp_path / "a")
    train(small, CrossEntropy(), _data(), _cfg(steps=5, batch_size=2, grad_accum=2), tmp_path / "b")
    changed = False
    reference = _model().state_dict()
    for name, value in big.state_dict().items():
        torch.testing.assert_close(small.state_dict()[name], value, rtol=0, atol=1e-5, msg=name)
        changed |= not torch.equal(value, reference[name])
    assert changed  # the runs did train


def test_training_lowers_the_cross_entropy_of_a_tiny_model(tmp_path):
    data = TrainingData(random_tokens(4, 16, seed=5).repeat(2, 1), seed=0)
    model = _model()

    def ce() -> float:
        with torch.no_grad():
            return cross_entropy(model(input_ids=data.sequences, use_cache=False).logits, data.sequences).item()

    before = ce()
    result = train(model, CrossEntropy(), data, _cfg(steps=20, batch_size=4, lr=3e-3, warmup_steps=2), tmp_path)
    assert not model.training  # handed back in eval mode
    assert ce() < before - 1.0, (before, ce())
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.steps == 20 and result.tokens == 20 * 4 * 16 and len(result.history) == 20
    assert [row["step"] for row in result.history] == list(range(1, 21))
    assert result.final_loss == result.history[-1]["loss"] == result.history[-1]["ce"]


# --- data order -------------------------------------------------------------------------------------------------


def test_micro_batches_are_a_pure_function_of_the_position():
    cfg = TrainConfig(steps=10, batch_size=3, grad_accum=2)
    one, two = _data(rows=10), _data(rows=10)
    for step, micro in [(0, 0), (4, 1), (1, 0), (4, 1), (9, 1)]:
        a, b = one.micro_batch(step, micro, 0, cfg, 1), two.micro_batch(step, micro, 0, cfg, 1)
        assert torch.equal(a.indices, b.indices)
        assert torch.equal(a.input_ids, one.sequences[a.indices])
    other_seed = TrainingData(one.sequences, seed=1)
    assert not torch.equal(
        torch.cat([one.micro_batch(s, 0, 0, TrainConfig(steps=5, batch_size=2), 1).indices for s in range(5)]),
        torch.cat([other_seed.micro_batch(s, 0, 0, TrainConfig(steps=5, batch_size=2), 1).indices for s in range(5)]),
    )


def test_every_row_is_visited_once_per_epoch_in_a_new_order_each_epoch():
    data = _data(rows=10)
    cfg = TrainConfig(steps=10, batch_size=2)
    epochs = [torch.cat([data.micro_batch(s, 0, 0, cfg, 1).indices for s in range(e * 5, e * 5 + 5)]) for e in range(3)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(10))
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    # A batch that straddles the end of an epoch takes the first rows of the next epoch's order.
    straddling = data.micro_batch(2, 0, 0, TrainConfig(steps=3, batch_size=4), 1).indices.tolist()
    assert straddling == epochs[0][8:10].tolist() + epochs[1][0:2].tolist()


def test_ranks_together_see_what_one_process_sees_with_accumulation():
    data = _data(rows=12)
    single = TrainConfig(steps=3, batch_size=2, grad_accum=4)
    multi = TrainConfig(steps=3, batch_size=2, grad_accum=2)
    for step in range(3):
        one = [data.micro_batch(step, m, 0, single, 1).indices for m in range(4)]
        many = [data.micro_batch(step, m, r, multi, 2).indices for m in range(2) for r in range(2)]
        assert torch.equal(torch.cat(one), torch.cat(many))


def test_empty_training_data_is_refused():
    with pytest.raises(CompactLMError, match="the training data is empty"):
        TrainingData(torch.zeros(0, 16, dtype=torch.long))


# --- checkpoints and resume -------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", [CrossEntropy, ScaledCE], ids=["ce", "with-extra-module"])
def test_an_interrupted_run_resumes_to_bitwise_the_same_result(tmp_path, objective):
    cfg = _cfg(steps=6, save_every=1)
    whole_objective = objective()
    whole = _model()
    expected = train(whole, whole_objective, _data(), cfg, tmp_path / "whole")

    work = tmp_path / "parts"
    with pytest.raises(TrainingInterrupted, match="after step 3 of 6.*--resume"):
        train(_model(), objective(), _data(), cfg, work, stop_after=3)
    assert _checkpoints(work) == ["step-0000002", "step-0000003"]  # only the newest two are kept
    assert sorted(p.name for p in (work / "checkpoints" / "step-0000003").iterdir()) == [
        "extras.safetensors",
        "model.safetensors",
        "optimizer.pt",
        "rng.pt",
        "state.json",
    ]

    resumed_objective = objective()
    resumed = _model(seed=7)  # another init: every weight must come from the checkpoint
    result = train(resumed, resumed_objective, _data(), cfg, work, resume=True)
    assert _checkpoints(work) == ["step-0000004", "step-0000005"]
    for name, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    for mine, theirs in zip(resumed_objective.modules(), whole_objective.modules(), strict=True):
        assert torch.equal(mine.weight, theirs.weight)
    assert [r["step"] for r in result.history] == list(range(1, 7))
    assert [r["loss"] for r in result.history] == [r["loss"] for r in expected.history]
    assert result.final_loss == expected.final_loss
    if objective is ScaledCE:
        assert whole_objective.scale.weight.item() != 1.0  # the extra module was trained


def test_resume_without_a_checkpoint_starts_from_the_beginning(tmp_path):
    cfg = _cfg(steps=3)
    fresh, resumed = _model(), _model()
    expected = train(fresh, CrossEntropy(), _data(), cfg, tmp_path / "a")
    result = train(resumed, CrossEntropy(), _data(), cfg, tmp_path / "b", resume=True)
    assert [r["loss"] for r in result.history] == [r["loss"] for r in expected.history]
    assert not (tmp_path / "b" / "checkpoints").exists()  # save_every=0 and no interruption: nothing written


@pytest.mark.parametrize("change,name", [({"lr": 2e-3}, "lr"), ({"batch_size": 4}, "batch_size")])
def test_resuming_with_other_settings_names_them(tmp_path, change, name):
    with pytest.raises(TrainingInterrupted):
        train(_model(), CrossEntropy(), _data(), _cfg(), tmp_path, stop_after=2)
    with pytest.raises(CompactLMError, match=rf"other settings \({name}\)") as info:
        train(_model(), CrossEntropy(), _data(), _cfg(**change), tmp_path, resume=True)
    assert "--overwrite" in str(info.value)
    # Settings that do not change the run's path (how often it saves, precision) may differ.
    result = train(_model(), CrossEntropy(), _data(), _cfg(save_every=3), tmp_path, resume=True)
    assert len(result.history) == 6


def test_a_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(CompactLMError, match="at step 3: training stopped") as info:
        train(_model(), Sabotaged(3, "nan"), _data(), _cfg(save_every=1), tmp_path)
    assert not isinstance(info.value, TrainingInterrupted)
    assert str(tmp_path / "checkpoints") in str(info.value) and "lower --lr" in str(info.value)
    assert _checkpoints(tmp_path) == ["step-0000001", "step-0000002"]
    state = json.loads((tmp_path / "checkpoints" / "step-0000002" / "state.json").read_text())
    assert state["step"] == 2 and all(math.isfinite(r["loss"]) for r in state["history"])


def test_a_nan_loss_before_any_checkpoint_does_not_claim_one_is_kept(tmp_path):
    with pytest.raises(CompactLMError, match="at step 3") as info:
        train(_model(), Sabotaged(3, "nan"), _data(), _cfg(save_every=0), tmp_path)
    assert not (tmp_path / "checkpoints").exists()
    assert "checkpoint is kept" not in str(info.value)


def test_sigterm_saves_a_checkpoint_raises_and_restores_the_handlers(tmp_path):
    seen: list[int] = []

    def previous_handler(signum, _frame):
        seen.append(signum)

    original = signal.signal(signal.SIGTERM, previous_handler)
    sigint_before = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(TrainingInterrupted, match=r"interrupted \(SIGTERM\) after step 2 of 6") as info:
            train(_model(), Sabotaged(2, "sigterm"), _data(), _cfg(save_every=0), tmp_path)
        assert "--resume" in str(info.value) and isinstance(info.value, CompactLMError)
        assert seen == []  # the loop's handler caught it, not the previous one
        assert signal.getsignal(signal.SIGTERM) is previous_handler
        assert signal.getsignal(signal.SIGINT) is sigint_before
    finally:
        signal.signal(signal.SIGTERM, original)
    assert _checkpoints(tmp_path) == ["step-0000002"]
    result = train(_model(), CrossEntropy(), _data(), _cfg(save_every=0), tmp_path, resume=True)
    assert [r["step"] for r in result.history] == list(range(1, 7))


# --- teacher correction (the same loop, CE, from the command line) ----------------------------------------------


def test_correct_teacher_fine_tunes_the_teacher_and_records_it(retrain_checkpoints, tmp_path):
    teacher, out = retrain_checkpoints["teacher"], tmp_path / "corrected"
    result = cli("compress", "correct-teacher", teacher, "--out", out, *small_run(retrain_checkpoints["corpus"]))
    assert result.exit_code == 0, result.output
    record = json.loads((out / "compactlm.json").read_text())
    assert record["parent"] == str(teacher.resolve()) and len(record["history"]) == 1
    step = record["history"][0]
    assert step["op"] == "correct" and step["steps"] == 3 and step["tokens"] == 3 * 2 * 16
    assert step["train"]["batch_size"] == 2 and step["seq_len"] == 16
    assert step["heldout_loss_before"] > 0 and step["heldout_loss"] > 0
    assert step["heldout_loss"] != step["heldout_loss_before"]
    assert "held-out loss" in result.output
    assert (out / "tokenizer.json").is_file() and not (tmp_path / ".corrected.work").exists()
    corrected, original = load_model(out), load_model(teacher)
    assert corrected.config.num_hidden_layers == original.config.num_hidden_layers == 4
    assert not torch.equal(corrected.model.layers[0].mlp.up_proj.weight, original.model.layers[0].mlp.up_proj.weight)


def test_out_of_memory_gives_a_hint_instead_of_a_traceback(tmp_path):
    class Hungry:
        name = "hungry"

        def modules(self):
            return []

        def loss(self, model, batch):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    with pytest.raises(CompactLMError, match="lower --batch-size"):
        train(_model(), Hungry(), _data(), _cfg(steps=2), tmp_path)


@pytest.mark.parametrize(("units", "expected"), [("amx_bf16", "bf16"), ("avx512_bf16", "bf16"), (None, "fp32")])
def test_auto_precision_is_bf16_only_on_a_cpu_with_bf16_units(monkeypatch, units, expected):
    from compactlm.compress import train as train_module
    from compactlm.core import host

    monkeypatch.setattr(host, "cpu_bf16", lambda: units)
    assert train_module.precision_used(TrainConfig(steps=1)) == expected
    assert train_module.precision_used(TrainConfig(steps=1, precision="fp32")) == "fp32"
    assert train_module.precision_used(TrainConfig(steps=1, precision="bf16")) == "bf16"


def test_bf16_autocast_trains_on_cpu(tmp_path):
    data = TrainingData(random_tokens(4, 16, seed=5).repeat(2, 1), seed=0)
    model = _model()
    with torch.no_grad():
        before = cross_entropy(model(input_ids=data.sequences, use_cache=False).logits, data.sequences).item()
    result = train(model, CrossEntropy(), data, _cfg(steps=20, batch_size=4, lr=3e-3, precision="bf16"), tmp_path)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights, bf16 math
    assert result.history[-1]["loss"] < 0.8 * before
