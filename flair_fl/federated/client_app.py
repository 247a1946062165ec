"""The ClientApp: one message = one FLAIR user's local training (or evaluation).

The closure captures only `ClientSpec` (plain values, re-sent with the app). The HDF5 reader,
the model and transforms live in the actor process, created lazily and kept between users.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from hydra.utils import instantiate
from torch import nn

from flair_fl.algorithms.scaffold import ScaffoldClient, split_control
from flair_fl.data.augment import TrainAugment
from flair_fl.data.datasets import TrainImages
from flair_fl.data.eval_split import EvalImages
from flair_fl.data.hdf5 import FlairReader, LabelSet
from flair_fl.data.source import open_reader
from flair_fl.federated import faults
from flair_fl.federated.transport import map_flat, write_flat
from flair_fl.federated.user_state import UserStateStore
from flair_fl.learning.local_training import LocalTraining, evaluate, train_local
from flair_fl.models.params import load_trainable, trainable_state
from flair_fl.protocol import (
    ARRAYS_KEY,
    COHORT_INDEX_KEY,
    CONFIG_KEY,
    EXAMPLES_WEIGHT_KEY,
    LAYOUT_KEY,
    META_KEY,
    METRICS_KEY,
    NUM_STEPS_KEY,
    PROXIMAL_MU_KEY,
    REPLY_DIR_KEY,
    REPLY_PATH_KEY,
    SERVER_ROUND_KEY,
    SPLIT_KEY,
    TRAIN_LOSS_KEY,
    UNIFORM_WEIGHT_KEY,
    USER_ID_KEY,
    USER_REPEAT_KEY,
    WEIGHTS_PATH_KEY,
    Layout,
    metric_state_to_record,
)
from flair_fl.services.memory import peak_rss_mb
from flair_fl.services.seeds import derive_seed


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
    eval_precision: str = "fp32"  # fp32 | bf16 (eval.precision)
    label_index: int | None = None  # binary mode: the one target column
    state_dir: str | None = None  # per-user client state (SCAFFOLD control variates)
    local_dp: dict[str, Any] | None = None  # client-side DP (DP-SGD) settings, privacy group
    extra: dict[str, Any] = field(default_factory=dict)
    reader_settings: dict[str, Any] = field(default_factory=dict)  # data.source.open_reader
    faults: faults.FaultSpec = field(default_factory=faults.FaultSpec)  # off unless configured
    gpu_fraction: float = 0.0  # the actor's share of its GPU (num_gpus): caps its memory
    data_path_env: str = "FLAIR_FL_NODE_DATA"  # on a node with this variable set, read data there


class _Runtime:
    """Per-process state: reader, resident model, transforms, device."""

    def __init__(self, spec: ClientSpec):
        torch.set_num_threads(max(1, spec.num_threads))
        self.device = torch.device("cuda" if spec.use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda" and 0 < spec.gpu_fraction < 1:
            # Ray shares the GPU between actors but does not cap their memory.
            torch.cuda.set_per_process_memory_fraction(spec.gpu_fraction)
        self.reader = open_reader(node_data_path(spec), **spec.reader_settings)
        self.idle_release = _IdleRelease() if self.device.type == "cuda" else None
        self.model: nn.Module = instantiate(spec.model)(num_classes=spec.num_labels)
        self.model.to(self.device)


class _IdleRelease:
    """Return cached GPU memory once an actor has been idle for a moment (between rounds,
    while the driver aggregates and evaluates), not after every client (that would make
    every client pay cudaMalloc again)."""

    def __init__(self, idle_s: float = 1.0):
        self.idle_s, self.generation, self.lock = idle_s, 0, threading.Lock()

    def job_done(self) -> None:
        with self.lock:
            self.generation += 1
            generation = self.generation
        timer = threading.Timer(self.idle_s, self._release, args=(generation,))
        timer.daemon = True
        timer.start()

    def job_started(self) -> None:
        with self.lock:
            self.generation += 1

    def _release(self, generation: int) -> None:
        with self.lock:
            if generation == self.generation:
                torch.cuda.empty_cache()


def node_data_path(spec: ClientSpec) -> str:
    """The data file on this node: `$FLAIR_FL_NODE_DATA` where set (a Ray cluster whose nodes keep
    the data at different paths), else the driver's path."""
    return os.environ.get(spec.data_path_env) or spec.hdf5_path


_RUNTIMES: dict[tuple[int, str], _Runtime] = {}


def _runtime(spec: ClientSpec) -> _Runtime:
    key = (os.getpid(), repr(spec))
    if key not in _RUNTIMES:
        _RUNTIMES.clear()  # one spec per process at a time: free the previous model
        _RUNTIMES[key] = _Runtime(spec)
    return _RUNTIMES[key]


def _load_global(runtime: _Runtime, msg: Message) -> dict[str, torch.Tensor]:
    """Load the global weights; return SCAFFOLD's server control variate (empty if none)."""
    config = msg.content.config_records[CONFIG_KEY]
    if WEIGHTS_PATH_KEY in config:  # shared transport: map the round's weights file
        layout = Layout.from_json(str(config[LAYOUT_KEY]))
        views = layout.views(map_flat(str(config[WEIGHTS_PATH_KEY]), layout))
        arrays = {k: torch.from_numpy(v) for k, v in views.items()}
    else:
        arrays = dict(msg.content.array_records[ARRAYS_KEY].to_torch_state_dict())
    weights, control = split_control(arrays)
    load_trainable(runtime.model, weights)
    return control


@dataclass
class _TrainJob:
    """One train message, ready to train: the user, its data and seeded generator, the
    round's local settings and, under SCAFFOLD, the user's control-variate step."""

    config: ConfigRecord
    user_id: str
    fault: str | None  # the fault client.faults injects here, if any
    dataset: TrainImages
    generator: torch.Generator
    settings: LocalTraining
    scaffold: ScaffoldClient | None
    started: float  # perf_counter at the start of loading, and at its end
    loaded: float


def _start_job(spec: ClientSpec, runtime: _Runtime, msg: Message) -> _TrainJob:
    """Draw the fault, load the global weights, seed the client, read the user's images."""
    config = msg.content.config_records[CONFIG_KEY]
    user_id, server_round = str(config[USER_ID_KEY]), int(str(config[SERVER_ROUND_KEY]))
    fault = spec.faults.draw(server_round, user_id)
    faults.before_training(spec.faults, fault, user_id, server_round)
    started = time.perf_counter()
    control = _load_global(runtime, msg)
    loaded = time.perf_counter()
    scaffold = None
    if control:  # SCAFFOLD: the user's step starts from the global weights just loaded
        store = UserStateStore(spec.state_dir or ".", "scaffold")
        scaffold = ScaffoldClient(store, user_id, control, trainable_state(runtime.model))
    seed = derive_seed(spec.seed, "client", server_round, user_id)
    if repeat := int(str(config.get(USER_REPEAT_KEY, 0))):  # drawn again (with replacement)
        seed = derive_seed(spec.seed, "client", server_round, user_id, repeat)
    dataset = train_images(spec, runtime.reader, user_id, seed, runtime.device)
    torch.manual_seed(seed)  # anything else drawing from torch's global RNG
    generator = torch.Generator().manual_seed(seed)
    return _TrainJob(
        config,
        user_id,
        fault,
        dataset,
        generator,
        _round_settings(spec, config),
        scaffold,
        started,
        loaded,
    )


def _round_settings(spec: ClientSpec, config: ConfigRecord) -> LocalTraining:
    """The local settings with this round's FedProx mu. mu travels once, in the message
    (PROXIMAL_MU_KEY, set by the strategy: AdaFedProx changes it between rounds); no entry
    means no proximal term."""
    mu = float(str(config.get(PROXIMAL_MU_KEY, 0.0)))
    if mu == spec.training.proximal_mu:
        return spec.training
    return LocalTraining(**{**spec.training.__dict__, "proximal_mu": mu})


def _train(spec: ClientSpec, runtime: _Runtime, job: _TrainJob) -> dict[str, float]:
    """Local training (DP-SGD under privacy=dp_sgd); SCAFFOLD corrects every gradient."""
    correction = job.scaffold.correction() if job.scaffold else None
    if spec.local_dp is not None:  # per-example clipping + noise (Opacus)
        from flair_fl.privacy.dp_sgd import train_local_dp_sgd  # Opacus only when needed

        return train_local_dp_sgd(
            runtime.model,
            job.dataset,
            job.settings,
            runtime.device,
            job.generator,
            spec.local_dp,
            correction,
            job.dataset.inputs,
        )
    return train_local(
        runtime.model,
        job.dataset,
        job.settings,
        runtime.device,
        job.generator,
        correction,
        job.dataset.inputs,
    )


def _update(runtime: _Runtime, job: _TrainJob, stats: dict[str, float]) -> dict[str, torch.Tensor]:
    """The trained weights to send (plus SCAFFOLD's control change; NaN under a nan fault)."""
    # Message transport: copies (ArrayRecord serialises them anyway). Shared transport:
    # the parameters themselves, written straight into the reply file.
    update = (
        trainable_state(runtime.model)
        if REPLY_DIR_KEY not in job.config or job.scaffold is not None
        else ({n: p.detach() for n, p in runtime.model.named_parameters() if p.requires_grad})
    )
    if job.scaffold is not None:
        update.update(job.scaffold.finish(update, int(stats["num_steps"]), job.settings.lr))
    if job.fault == "nan":
        with torch.no_grad():
            for tensor in update.values():
                tensor.fill_(float("nan"))
    return update


def _reply_arrays(
    config: ConfigRecord, arrays: dict[str, torch.Tensor], meta: dict[str, Any]
) -> RecordDict:
    """The update as an ArrayRecord (message transport) or a file (shared transport)."""
    if REPLY_DIR_KEY not in config:
        return RecordDict({ARRAYS_KEY: ArrayRecord(arrays)})
    name = f"c{meta[COHORT_INDEX_KEY]}-{uuid.uuid4().hex[:8]}.f32"
    path = Path(str(config[REPLY_DIR_KEY])) / name
    layout = write_flat(path, arrays)
    meta.update({REPLY_PATH_KEY: str(path), LAYOUT_KEY: layout.to_json()})
    return RecordDict()


def _reply_meta(config: ConfigRecord, user_id: str) -> dict[str, Any]:
    """Who the reply is from: the user and its place in the cohort."""
    return {USER_ID_KEY: user_id, COHORT_INDEX_KEY: int(str(config[COHORT_INDEX_KEY]))}


def _resource_metrics(runtime: _Runtime) -> dict[str, float]:
    peak_rss = peak_rss_mb()
    gpu = 0.0
    if runtime.device.type == "cuda":
        gpu = torch.cuda.max_memory_allocated(runtime.device) / 2**20
    return {"peak-rss-mb": float(peak_rss), "gpu-mem-mb": float(gpu)}


def client_train(spec: ClientSpec, msg: Message) -> Message:
    """Train the global model on one user's data; reply with the new trainable weights."""
    runtime = _runtime(spec)
    if runtime.idle_release:
        runtime.idle_release.job_started()
    job = _start_job(spec, runtime, msg)  # 1. load: weights, seeds, the user's images
    stats = _train(spec, runtime, job)  # 2. train
    trained = time.perf_counter()
    meta = _reply_meta(job.config, job.user_id)  # 3. reply: the update, its metrics
    content = _reply_arrays(job.config, _update(runtime, job, stats), meta)
    content[META_KEY] = ConfigRecord(meta)
    content[METRICS_KEY] = MetricRecord(
        {
            TRAIN_LOSS_KEY: stats["train_loss"],
            EXAMPLES_WEIGHT_KEY: int(stats["num_examples"]),
            UNIFORM_WEIGHT_KEY: 1,
            NUM_STEPS_KEY: int(stats["num_steps"]),
            "time-load": job.loaded - job.started,
            "time-compute": trained - job.loaded,
            "time-reply": time.perf_counter() - trained,
            **_resource_metrics(runtime),
        }
    )
    if runtime.idle_release:
        runtime.idle_release.job_done()
    return Message(content=content, reply_to=msg)


def train_images(
    spec: ClientSpec, reader: FlairReader, user_id: str, seed: int, device: torch.device
) -> TrainImages:
    """A user's capped train images on `device` (decoded there), augmented per image with
    crops and flips drawn from a generator seeded by the client's (seed, round, user) seed."""
    return TrainImages.from_file(
        reader,
        user_id,
        spec.label_set,
        TrainAugment(spec.input_size),
        torch.Generator().manual_seed(derive_seed(seed, "augment")),
        device,
        spec.max_images,
        spec.label_index,
    )


def client_evaluate(spec: ClientSpec, msg: Message) -> Message:
    """Evaluate the global model on one (val) user; reply with summable metric statistics."""
    runtime = _runtime(spec)
    if runtime.idle_release:
        runtime.idle_release.job_started()
    config = msg.content.config_records[CONFIG_KEY]
    user_id, split = str(config[USER_ID_KEY]), str(config.get(SPLIT_KEY, "val"))
    _load_global(runtime, msg)
    data = runtime.reader.read_user(split, user_id, spec.label_set)
    images = EvalImages.from_user(data, spec.input_size, runtime.device, spec.label_index)
    state = evaluate(
        runtime.model,
        images,
        spec.num_labels,
        spec.eval_batch_size,
        runtime.device,
        spec.eval_precision,
    )
    if runtime.idle_release:
        runtime.idle_release.job_done()
    content = RecordDict(
        {
            METRICS_KEY: metric_state_to_record(state),
            META_KEY: ConfigRecord(_reply_meta(config, user_id)),
        }
    )
    return Message(content=content, reply_to=msg)


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
