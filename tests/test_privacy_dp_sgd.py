"""Client-side DP-SGD (Opacus): clipping really bounds a step, accounting, model checks."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import TensorDataset
from torchvision.models import resnet18

from flair_fl.errors import ConfigError
from flair_fl.learning.local_training import LocalTraining
from flair_fl.models.resnet import FrozenBatchNorm2d, resnet18_groupnorm
from flair_fl.models.small_cnn import small_cnn
from flair_fl.privacy.dp_sgd import DPSGDSettings, train_local_dp_sgd
from flair_fl.privacy.local import LocalDPSGD
from flair_fl.privacy.opacus_models import opacus_ready_copy, require_dp_sgd_compatible

CPU = torch.device("cpu")


def _data(n: int, labels: int = 17, size: int = 16, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=g)
    return TensorDataset(images, (torch.rand(n, labels, generator=g) > 0.7).float())


def _train(
    model: nn.Module, data: TensorDataset, dp: DPSGDSettings, batch: int = 2, epochs: int = 1
) -> dict[str, float]:
    settings = LocalTraining(epochs=epochs, batch_size=batch, lr=1.0, grad_clip=None)
    return train_local_dp_sgd(model, data, settings, CPU, torch.Generator().manual_seed(1), dp)


def _weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().ravel().clone() for p in model.parameters()])


def _reply(user: str, num_examples: int, steps: int) -> Message:
    meta = Metadata(1, "", 1, 0, "instruction", "", 0.0, 1e9, MessageType.TRAIN)
    content = RecordDict(
        {
            "metrics": MetricRecord(
                {"num-examples": num_examples, "uniform-weight": 1, "num-steps": steps}
            ),
            "meta": ConfigRecord({"user-id": user, "cohort-index": 0}),
        }
    )
    return Message(content=content, metadata=meta)


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")  # z ~ 0: eps huge
def test_one_step_moves_the_model_by_at_most_lr_times_the_clip_norm() -> None:
    # 4 images, batch 4: Poisson rate 1, so the one step sees all 4. Opacus sums the
    # clipped per-example gradients (each <= C) and divides by the expected batch (4):
    # with negligible noise the step is at most lr * C, whatever the raw gradients are.
    torch.manual_seed(0)
    model = small_cnn(17, width=8)
    before = _weights(model)

    _train(model, _data(4), DPSGDSettings(noise_multiplier=1e-9, max_grad_norm=1e-3), batch=4)

    step = float(torch.linalg.vector_norm(_weights(model) - before))
    assert 0 < step <= 1.0 * 1e-3 * (1 + 1e-4)


def test_client_reports_opacus_epsilon_and_the_server_ledger_agrees() -> None:
    torch.manual_seed(0)
    dp = DPSGDSettings(noise_multiplier=1.2, max_grad_norm=1.0, delta=1e-5)

    stats = _train(small_cnn(17, width=8), _data(5), dp, batch=2, epochs=2)

    # 5 images, batch 2: 3 batches per epoch, Poisson rate 1/3, 2 epochs = 6 steps.
    assert stats["dp_sample_rate"] == pytest.approx(1 / 3)
    assert stats["num_steps"] == 6 and stats["num_examples"] == 5
    opacus = RDPAccountant()
    opacus.history = [(1.2, 1 / 3, 6)]
    assert stats["dp_epsilon"] == pytest.approx(opacus.get_epsilon(1e-5), rel=1e-9)
    privacy = LocalDPSGD(noise_multiplier=1.2, max_grad_norm=1.0, delta=1e-5, batch_size=2)
    privacy.record(1, [_reply("u1", 5, 6)])
    assert privacy.round_metrics(1)["dp_sgd_epsilon_round"] == pytest.approx(stats["dp_epsilon"])
    privacy.record(2, [_reply("u1", 5, 6), _reply("u2", 1, 2)])
    assert privacy.round_metrics(2)["dp_sgd_epsilon"] > stats["dp_epsilon"]  # u1 composed


def test_dp_sgd_is_reproducible_and_leaves_the_resident_model_clean() -> None:
    torch.manual_seed(0)
    first, second = small_cnn(17, width=8), small_cnn(17, width=8)
    second.load_state_dict(first.state_dict())
    dp = DPSGDSettings(noise_multiplier=1.0, max_grad_norm=1.0)

    _train(first, _data(6), dp)
    _train(second, _data(6), dp)

    assert torch.equal(_weights(first), _weights(second))
    modules = list(first.modules())
    assert not any(m._forward_hooks or m._backward_hooks for m in modules)
    assert not any(hasattr(p, "grad_sample") for p in first.parameters())
    assert any(getattr(m, "inplace", False) for m in modules)  # only the copy lost in-place


def test_batchnorm_model_is_refused_naming_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"model\.norm=group.*model=resnet18"):
        require_dp_sgd_compatible(small_cnn(17, norm="batch"))
    require_dp_sgd_compatible(small_cnn(17, norm="group"))


@pytest.mark.parametrize("norm", ["group", "frozen_batch"])
def test_resnet18_trains_with_dp_sgd(norm: str) -> None:
    torch.manual_seed(0)
    model = (
        resnet18_groupnorm(num_classes=3)
        if norm == "group"
        else resnet18(num_classes=3, norm_layer=FrozenBatchNorm2d)
    )
    before = _weights(model)

    stats = _train(model, _data(2, labels=3), DPSGDSettings(max_grad_norm=0.5))

    assert stats["num_steps"] == 1 and stats["dp_epsilon"] > 0
    assert not torch.equal(_weights(model), before)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_frozen_batchnorm_per_example_gradients_match_autograd() -> None:
    # The DP-SGD copy replaces FrozenBatchNorm2d by a buffer-free twin with its own
    # per-example gradient rule; that rule must equal autograd on one example at a time.
    torch.manual_seed(0)
    bn = FrozenBatchNorm2d(4)
    bn.running_mean.uniform_(-1, 1)  # type: ignore[union-attr]
    bn.running_var.uniform_(0.5, 2)  # type: ignore[union-attr]
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    nn.init.uniform_(bn.bias, -0.5, 0.5)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), bn, nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)
    )
    x = torch.randn(3, 3, 8, 8)

    sampled = GradSampleModule(opacus_ready_copy(model, CPU), loss_reduction="sum")
    sampled(x).pow(2).sum().backward()
    per_example = [p.grad_sample.clone() for p in sampled.parameters()]
    sampled._close()

    for i in range(3):
        model.zero_grad()
        model(x[i : i + 1]).pow(2).sum().backward()
        for p, samples in zip(model.parameters(), per_example, strict=True):
            torch.testing.assert_close(samples[i], p.grad, rtol=1e-4, atol=1e-6)


def test_dp_sgd_ledger_survives_a_resume() -> None:
    first = LocalDPSGD(noise_multiplier=1.0, batch_size=4)
    first.record(1, [_reply("u1", 9, 3), _reply("u2", 2, 1)])

    resumed = LocalDPSGD(noise_multiplier=1.0, batch_size=4)
    resumed.load_state_dict(first.state_dict())
    first.record(2, [_reply("u1", 9, 3)])
    resumed.record(2, [_reply("u1", 9, 3)])

    assert resumed.round_metrics(2) == first.round_metrics(2)
    assert resumed.round_metrics(1) == first.round_metrics(1)
