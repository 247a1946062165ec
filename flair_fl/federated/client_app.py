"""The ClientApp: one message = one FLAIR user's local training (or evaluation).

The closure captures only `ClientSpec` (plain values, re-sent with the app). The HDF5 reader,
the model and transforms live in the actor process, created lazily and kept between users.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from hydra.utils import instantiate
from torch import nn

from flair_fl.data.datasets import UserDataset, build_transform
from flair_fl.data.hdf5 import LabelSet
from flair_fl.data.source import open_reader
from flair_fl.federated.sampling import derive_seed
from flair_fl.federated.user_state import UserStateStore, scaffold_update, split_control
from flair_fl.metrics import MetricState
from flair_fl.models.params import load_trainable, trainable_state
from flair_fl.training import LocalTraining, evaluate, train_local

ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, META_KEY = "arrays", "config", "metrics", "meta"
UNIFORM_WEIGHT_KEY = "uniform-weight"  # always 1: per-user (unweighted) averaging
EXAMPLES_WEIGHT_KEY = "num-examples"


@dataclass(frozen=True)
class ClientSpec:
    """Everything a client needs, as plain values."""

    hdf5_path: str
    label_set: LabelSet
    input_size: int
    num_labels: int
    model: dict[str, Any]  # Hydra node of a model factory (`_partial_: true`)
    training: LocalTraining
    max_images: int | None
    seed: int
    use_gpu: bool = False
    num_threads: int = 1
    eval_batch_size: int = 512
    label_index: int | None = None  # binary mode: the one target column
    state_dir: str | None = None  # per-user client state (SCAFFOLD control variates)
    local_dp: dict[str, Any] | None = None  # client-side DP (DP-SGD) settings, privacy group
    extra: dict[str, Any] = field(default_factory=dict)
    reader_settings: dict[str, Any] = field(default_factory=dict)  # data.source.open_reader


class _Runtime:
    """Per-process state: reader, resident model, transforms, device."""

    def __init__(self, spec: ClientSpec):
        torch.set_num_threads(max(1, spec.num_threads))
        self.device = torch.device("cuda" if spec.use_gpu and torch.cuda.is_available() else "cpu")
        self.reader = open_reader(spec.hdf5_path, **spec.reader_settings)
        self.model: nn.Module = instantiate(spec.model)(num_classes=spec.num_labels)
        self.model.to(self.device)
        self.train_transform = build_transform(train=True, size=spec.input_size)
        self.eval_transform = build_transform(train=False, size=spec.input_size)


_RUNTIMES: dict[tuple[int, str], _Runtime] = {}


def _runtime(spec: ClientSpec) -> _Runtime:
    key = (os.getpid(), repr(spec))
    if key not in _RUNTIMES:
        _RUNTIMES.clear()  # one spec per process at a time: free the previous model
        _RUNTIMES[key] = _Runtime(spec)
    return _RUNTIMES[key]


def _load_global(runtime: _Runtime, msg: Message) -> dict[str, torch.Tensor]:
    """Load the global weights; return SCAFFOLD's server control variate (empty if none)."""
    arrays = msg.content.array_records[ARRAYS_KEY].to_torch_state_dict()
    weights, control = split_control(dict(arrays))
    load_trainable(runtime.model, weights)
    return control


def client_train(spec: ClientSpec, msg: Message) -> Message:
    """Train the global model on one user's data; reply with the new trainable weights."""
    runtime = _runtime(spec)
    config = msg.content.config_records[CONFIG_KEY]
    user_id, server_round = str(config["user-id"]), int(str(config["server-round"]))
    control = _load_global(runtime, msg)
    before = trainable_state(runtime.model)
    dataset = UserDataset.from_file(
        runtime.reader,
        "train",
        user_id,
        spec.label_set,
        runtime.train_transform,
        spec.max_images,
        spec.label_index,
    )
    seed = derive_seed(spec.seed, "client", server_round, user_id)
    torch.manual_seed(seed)  # transforms draw from torch's global RNG
    generator = torch.Generator().manual_seed(seed)
    settings = spec.training
    mu = float(str(config.get("proximal-mu", settings.proximal_mu)))
    if mu != settings.proximal_mu:
        settings = LocalTraining(**{**settings.__dict__, "proximal_mu": mu})
    store = user_control = None
    correction = None
    if control:  # SCAFFOLD: correct every local gradient by (c - c_i)
        store = UserStateStore(spec.state_dir or ".", "scaffold")
        user_control = store.load(user_id) or {k: torch.zeros_like(v) for k, v in control.items()}
        correction = {k: control[k] - user_control[k] for k in control}
    if spec.local_dp is not None:  # privacy=dp_sgd: per-example clipping + noise (Opacus)
        from flair_fl.privacy.dp_sgd import train_local_dp_sgd  # Opacus only when needed

        stats = train_local_dp_sgd(
            runtime.model, dataset, settings, runtime.device, generator, spec.local_dp, correction
        )
    else:
        stats = train_local(runtime.model, dataset, settings, runtime.device, generator, correction)
    reply = trainable_state(runtime.model)
    if store is not None and user_control is not None:
        new_control, delta = scaffold_update(
            control, user_control, before, reply, int(stats["num_steps"]), settings.lr
        )
        store.save(user_id, new_control)
        reply.update(delta)
    metrics = MetricRecord(
        {
            "train-loss": stats["train_loss"],
            EXAMPLES_WEIGHT_KEY: int(stats["num_examples"]),
            UNIFORM_WEIGHT_KEY: 1,
            "num-steps": int(stats["num_steps"]),
        }
    )
    content = RecordDict(
        {
            ARRAYS_KEY: ArrayRecord(reply),
            METRICS_KEY: metrics,
            META_KEY: ConfigRecord(
                {"user-id": user_id, "cohort-index": int(str(config["cohort-index"]))}
            ),
        }
    )
    return Message(content=content, reply_to=msg)


def client_evaluate(spec: ClientSpec, msg: Message) -> Message:
    """Evaluate the global model on one (val) user; reply with summable metric statistics."""
    runtime = _runtime(spec)
    config = msg.content.config_records[CONFIG_KEY]
    user_id, split = str(config["user-id"]), str(config.get("split", "val"))
    _load_global(runtime, msg)
    dataset = UserDataset.from_file(
        runtime.reader,
        split,
        user_id,
        spec.label_set,
        runtime.eval_transform,
        None,
        spec.label_index,
    )
    state = evaluate(runtime.model, dataset, spec.num_labels, spec.eval_batch_size, runtime.device)
    content = RecordDict(
        {
            METRICS_KEY: metric_state_to_record(state),
            META_KEY: ConfigRecord(
                {"user-id": user_id, "cohort-index": int(str(config["cohort-index"]))}
            ),
        }
    )
    return Message(content=content, reply_to=msg)


def metric_state_to_record(state: MetricState) -> MetricRecord:
    """Flatten summable metric statistics into a MetricRecord (int lists)."""
    return MetricRecord(
        {
            "tp": state.tp.ravel().tolist(),
            "fp": state.fp.ravel().tolist(),
            "fn": state.fn.ravel().tolist(),
            "tp-half": state.tp_half.tolist(),
            "fp-half": state.fp_half.tolist(),
            "fn-half": state.fn_half.tolist(),
            "loss-sum": state.loss_sum,
            "num-images": state.num_images,
            EXAMPLES_WEIGHT_KEY: state.num_images,
            UNIFORM_WEIGHT_KEY: 1,
        }
    )


def metric_state_from_record(record: MetricRecord, num_labels: int) -> MetricState:
    """Inverse of `metric_state_to_record`."""

    def grid(key: str) -> np.ndarray:
        return np.asarray(record[key], dtype=np.int64).reshape(-1, num_labels)

    def row(key: str) -> np.ndarray:
        return np.asarray(record[key], dtype=np.int64)

    return MetricState(
        grid("tp"),
        grid("fp"),
        grid("fn"),
        row("tp-half"),
        row("fp-half"),
        row("fn-half"),
        float(np.asarray(record["loss-sum"])),
        int(np.asarray(record["num-images"])),
    )


def make_client_app(spec: ClientSpec) -> ClientApp:
    """A ClientApp whose train/evaluate handlers serve FLAIR users named in the message."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return client_train(spec, msg)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        return client_evaluate(spec, msg)

    return app
