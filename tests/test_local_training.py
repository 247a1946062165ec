"""Client-side algorithms (FedAvg, FedProx, SCAFFOLD) against independent computations."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from flwr.serverapp.strategy import FedAvg
from torch.utils.data import TensorDataset

from flair_fl.algorithms.scaffold import ScaffoldClient, scaffold_update, split_control
from flair_fl.federated.user_state import UserStateStore
from flair_fl.learning.local_training import LocalTraining, train_local
from flair_fl.models.params import load_trainable, trainable_state
from flair_fl.models.small_cnn import small_cnn
from tests.flower_messages import reply

CPU = torch.device("cpu")


def _users(seed: int = 0, sizes: tuple[int, ...] = (3, 5, 2)) -> list[TensorDataset]:
    g = torch.Generator().manual_seed(seed)
    return [
        TensorDataset(
            torch.randn(n, 3, 8, 8, generator=g), (torch.rand(n, 4, generator=g) > 0.6).float()
        )
        for n in sizes
    ]


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return small_cnn(4, width=4)


def _train(model: torch.nn.Module, data: TensorDataset, **settings: object) -> dict[str, float]:
    base = {"epochs": 1, "batch_size": len(data), "lr": 0.1, "grad_clip": None}
    return train_local(
        model,
        data,
        LocalTraining(**{**base, **settings}),  # type: ignore[arg-type]
        CPU,
        torch.Generator().manual_seed(0),
    )


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.flatten() for v in state.values()])


def test_fedavg_one_full_batch_step_equals_centralized_gradient_descent() -> None:
    users, model = _users(), _model()
    start = trainable_state(model)
    replies = []
    for data in users:
        local = copy.deepcopy(model)
        _train(local, data)
        replies.append(
            reply({k: v.numpy() for k, v in trainable_state(local).items()}, num_examples=len(data))
        )
    strategy = FedAvg(weighted_by_key="num-examples", min_available_nodes=1)
    federated, _ = strategy.aggregate_train(1, replies)

    pooled_x = torch.cat([d.tensors[0] for d in users])
    pooled_y = torch.cat([d.tensors[1] for d in users])
    central = copy.deepcopy(model)
    load_trainable(central, start)
    loss = F.binary_cross_entropy_with_logits(central(pooled_x), pooled_y)
    grads = torch.autograd.grad(loss, [p for p in central.parameters() if p.requires_grad])
    expected = {k: v - 0.1 * g for (k, v), g in zip(start.items(), grads, strict=True)}

    for key, value in federated.items():
        assert value.numpy() == pytest.approx(expected[key].numpy(), abs=1e-5), key


def test_fedprox_gradient_is_mu_times_distance_to_global() -> None:
    data = TensorDataset(*(t[:1] for t in _users()[0].tensors))  # one image: same batch twice
    lr, mu = 0.1, 0.7
    w0 = _flat(trainable_state(_model()))
    one_step = _model()
    _train(one_step, data)
    w1 = _flat(trainable_state(one_step))
    plain, prox = _model(), _model()
    _train(plain, data, epochs=2)
    _train(prox, data, epochs=2, proximal_mu=mu)

    # Step 2 differs only by the proximal gradient mu * (w1 - w0), times -lr.
    difference = _flat(trainable_state(prox)) - _flat(trainable_state(plain))
    assert difference == pytest.approx((-lr * mu * (w1 - w0)).tolist(), abs=1e-6)


def test_fedprox_large_mu_keeps_the_local_model_at_the_global_one() -> None:
    data = _users(sizes=(20,))[0]
    w0 = _flat(trainable_state(_model()))
    moves = {}
    for mu in (0.0, 50.0):
        model = _model()
        _train(model, data, epochs=20, batch_size=20, lr=0.01, proximal_mu=mu)
        moves[mu] = float(torch.linalg.norm(_flat(trainable_state(model)) - w0))
    # With lr * mu = 0.5 the deviation contracts by half each step: it stays within
    # ~1 / (steps * lr * mu) = 0.1 of the unconstrained one.
    assert moves[50.0] < 0.15 * moves[0.0]


def test_scaffold_local_steps_and_option_two_control_update() -> None:
    data, lr = _users(sizes=(4,))[0], 0.05
    model = _model()
    x = trainable_state(model)
    c = {k: torch.randn_like(v) * 0.01 for k, v in x.items()}
    c_i = {k: torch.randn_like(v) * 0.01 for k, v in x.items()}
    correction = {k: c[k] - c_i[k] for k in c}

    stats = train_local(
        model,
        data,
        LocalTraining(epochs=3, batch_size=4, lr=lr, grad_clip=None),
        CPU,
        torch.Generator().manual_seed(0),
        correction,
    )
    y = trainable_state(model)

    manual = _model()  # independent: y <- y - lr (grad f(y) + c - c_i), K full-batch steps
    params = dict((n, p) for n, p in manual.named_parameters() if p.requires_grad)
    for _ in range(3):
        loss = F.binary_cross_entropy_with_logits(manual(data.tensors[0]), data.tensors[1])
        grads = torch.autograd.grad(loss, list(params.values()))
        with torch.no_grad():
            for (name, p), g in zip(params.items(), grads, strict=True):
                p -= lr * (g + correction[name])
    for name, p in params.items():
        assert y[name] == pytest.approx(p.detach(), abs=1e-5), name

    new_c_i, delta = scaffold_update(c, c_i, x, y, int(stats["num_steps"]), lr)
    for name in x:
        expected = c_i[name] - c[name] + (x[name] - y[name]) / (3 * lr)
        assert new_c_i[name] == pytest.approx(expected, abs=1e-6)
        assert delta["scaffold.dc." + name] == pytest.approx(expected - c_i[name], abs=1e-6)


def test_user_state_store_round_trip_and_split(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = UserStateStore(tmp_path, "scaffold")
    state = {"w": torch.arange(3.0)}
    store.save("123@N01", state)

    assert store.load("123@N01")["w"].tolist() == [0.0, 1.0, 2.0]  # type: ignore[index]
    assert store.load("never-seen") is None
    weights, control = split_control({"w": torch.ones(1), "scaffold.c.w": torch.zeros(1)})
    assert list(weights) == ["w"] and list(control) == ["w"]
    assert not list(tmp_path.glob("scaffold/*.tmp"))


def test_scaffold_client_starts_at_zero_and_keeps_the_new_control(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = UserStateStore(tmp_path, "scaffold")
    c, x = {"w": torch.tensor([0.5, -1.0])}, {"w": torch.tensor([1.0, 2.0])}
    y = {"w": torch.tensor([0.0, 1.0])}

    first = ScaffoldClient(store, "u", c, x)
    correction = first.correction()
    delta = first.finish(y, steps=2, lr=0.25)
    second = ScaffoldClient(store, "u", c, x)

    assert correction["w"].tolist() == [0.5, -1.0]  # c - c_i with c_i = 0 the first time
    expected, _ = scaffold_update(c, {"w": torch.zeros(2)}, x, y, 2, 0.25)
    assert second.user_control["w"].tolist() == expected["w"].tolist() == [1.5, 3.0]
    assert delta["scaffold.dc.w"].tolist() == [1.5, 3.0]
    assert second.correction()["w"].tolist() == [-1.0, -4.0]


def test_bf16_autocast_trains_close_to_fp32_with_fp32_weights() -> None:
    data = _users(sizes=(16,))[0]
    fp32, bf16 = _model(), _model()
    loss32 = _train(fp32, data, epochs=3)["train_loss"]
    loss16 = _train(bf16, data, epochs=3, precision="bf16")["train_loss"]
    assert all(p.dtype == torch.float32 for p in bf16.parameters()), "weights stay fp32"
    assert loss16 == pytest.approx(loss32, rel=0.05)
    delta = _flat(trainable_state(bf16)) - _flat(trainable_state(fp32))
    assert 0 < delta.norm() < 0.05 * _flat(trainable_state(fp32)).norm()  # bf16 did run


def test_channels_last_gives_the_same_training_in_nhwc() -> None:
    data = _users(sizes=(6,))[0]
    nchw, nhwc = _model(), _model()
    _train(nchw, data)
    _train(nhwc, data, channels_last=True)
    conv = next(p for p in nhwc.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(
        _flat(trainable_state(nhwc)), _flat(trainable_state(nchw)), rtol=1e-4, atol=1e-5
    )


def test_unknown_precision_names_the_key() -> None:
    with pytest.raises(ValueError, match=r"client\.precision='fp8'"):
        LocalTraining(precision="fp8")
