"""GPU paths of the training loop: skipped without CUDA (CI has none; run them on a GPU host)."""

from __future__ import annotations

import pytest
import torch

from compactlm.compress.train import CrossEntropy, TrainingData, train
from compactlm.compress.train_config import TrainConfig
from tests.helpers import random_tokens, tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


def test_bf16_autocast_training_on_cuda_lowers_the_loss(tmp_path):
    data = TrainingData(random_tokens(8, 32))
    cfg = TrainConfig(steps=20, batch_size=8, lr=3e-3, min_lr=3e-4, precision="auto", save_every=0)
    result = train(tiny_model("llama"), CrossEntropy(), data, cfg, tmp_path)
    assert next(iter(result.history))["loss"] > result.final_loss
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in result.history)
