"""One experiment: build every piece from the config, run the federated loop, report.

`run.py` calls `run_experiment` under Hydra; tests call it with a composed config.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from flair_fl.config_checks import ConfigError, validate_run_config
from flair_fl.data.datasets import SplitDataset, build_transform
from flair_fl.data.raw import FlairFormatError
from flair_fl.data.source import FederatedData
from flair_fl.federated.client_app import (
    EXAMPLES_WEIGHT_KEY,
    METRICS_KEY,
    UNIFORM_WEIGHT_KEY,
    ClientSpec,
    make_client_app,
    metric_state_from_record,
)
from flair_fl.federated.sampling import CohortSampler, derive_seed
from flair_fl.federated.server_app import LoopOutcome, RoundPlan, make_server_app
from flair_fl.federated.simulation import run_simulation
from flair_fl.loggers import RunLogger
from flair_fl.loggers.console import ConsoleProgress
from flair_fl.metrics import MetricState
from flair_fl.models.params import load_trainable, trainable_state
from flair_fl.privacy import Privacy, PrivacyContext
from flair_fl.training import LocalTraining, evaluate

log = logging.getLogger(__name__)
WEIGHT_KEYS = {"uniform": UNIFORM_WEIGHT_KEY, "examples": EXAMPLES_WEIGHT_KEY}


def build(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, with our own errors un-wrapped and bad values named.

    Hydra wraps every exception of a target in InstantiationException; a user should see
    "data.path=...: no prepared FLAIR HDF5 file" or "data: num_users must be >= 3", not a
    Hydra traceback.
    """
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError | FlairFormatError):
            raise cause from None
        if isinstance(cause, ValueError | TypeError):
            raise ConfigError(f"{key}: {cause}") from None
        raise


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class CentralEvaluator:
    """Evaluates global weights on a whole split in the driver."""

    def __init__(
        self, model: torch.nn.Module, data: FederatedData, batch_size: int, device: torch.device
    ):
        self.model, self.data, self.batch_size, self.device = model, data, batch_size, device
        self.transform = build_transform(train=False, size=data.input_size)

    def __call__(self, arrays: ArrayRecord, split: str) -> dict[str, float]:
        load_trainable(self.model, arrays.to_torch_state_dict())
        dataset = SplitDataset(self.data.reader, split, self.data.label_set, self.transform)
        state = evaluate(self.model, dataset, self.data.num_labels, self.batch_size, self.device)
        return {f"{split}_{k}": v for k, v in state.compute().items()}


def _build_strategy(cfg: DictConfig, privacy: Privacy, context: PrivacyContext) -> Any:
    strategy = build(
        cfg.strategy.server,
        "strategy.server",
        fraction_train=1e-9,  # the strategy's own node sampling is replaced by ours
        min_train_nodes=1,
        min_available_nodes=cfg.simulation.num_supernodes,
        weighted_by_key=context.weighted_by_key,
    )
    return privacy.wrap(strategy, context)


def _client_spec(cfg: DictConfig, data: FederatedData, privacy: Privacy) -> ClientSpec:
    resources = cfg.simulation.backend.client_resources
    client = cfg.client
    return ClientSpec(
        hdf5_path=str(data.hdf5_path),
        label_set=data.label_set,
        input_size=data.input_size,
        num_labels=data.num_labels,
        model=OmegaConf.to_container(cfg.model, resolve=True),  # type: ignore[arg-type]
        training=LocalTraining(
            epochs=client.epochs,
            batch_size=client.batch_size,
            lr=float(client.lr),
            momentum=float(client.momentum),
            grad_clip=None if client.grad_clip is None else float(client.grad_clip),
            proximal_mu=float(cfg.strategy.get("proximal_mu", 0.0)),
        ),
        max_images=client.max_images,
        seed=cfg.seed,
        use_gpu=cfg.device != "cpu" and float(resources.get("num_gpus", 0)) > 0,
        num_threads=int(resources.get("num_cpus", 1)),
        eval_batch_size=cfg.eval.batch_size,
        local_dp=privacy.client_settings(),
    )


def run_experiment(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Run one configured experiment; returns the summary (also written to summary.json)."""
    started = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    validate_run_config(cfg)
    data: FederatedData = build(cfg.data, "data")
    data.require_splits("train", "val", *(["test"] if cfg.eval.test_at_end else []))
    train_users = list(data.reader.population("train"))
    validate_run_config(cfg, num_train_users=len(train_users))
    (out / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.aggregation not in WEIGHT_KEYS:
        raise ConfigError(
            f"aggregation={cfg.aggregation!r}: expected one of {', '.join(WEIGHT_KEYS)}"
        )
    privacy: Privacy = build(cfg.privacy, "privacy")
    context = PrivacyContext(
        cohort_size=cfg.cohort_size,
        population_size=len(train_users),
        num_rounds=cfg.num_rounds,
        seed=cfg.seed,
        weighted_by_key=WEIGHT_KEYS[cfg.aggregation],
    )
    strategy = _build_strategy(cfg, privacy, context)
    _report_privacy(privacy, out)

    torch.manual_seed(derive_seed(cfg.seed, "model-init"))
    np.random.seed(derive_seed(cfg.seed, "numpy") % 2**32)
    model = build(cfg.model, "model")(num_classes=data.num_labels)
    initial = ArrayRecord(trainable_state(model))
    evaluator = CentralEvaluator(model, data, cfg.eval.batch_size, _device(cfg.device))
    loggers: list[RunLogger] = [build(node, "logger", out_dir=out) for node in cfg.logger.values()]
    initial_val = evaluator(initial, "val")
    print(
        f"flair-fl: {len(train_users)} train users, cohort {cfg.cohort_size}, "
        f"{cfg.num_rounds} rounds, {data.num_labels} labels ({data.label_set}); untrained "
        f"val macro AP {initial_val['val_macro_ap']:.4f} micro AP "
        f"{initial_val['val_micro_ap']:.4f}",
        flush=True,
    )
    tracker = RoundTracker(cfg, evaluator, privacy, loggers, out, started, initial_val)

    plan = _round_plan(cfg, data, train_users, privacy)
    outcome = LoopOutcome()
    server_app = make_server_app(
        strategy, initial, plan, tracker.on_round, outcome, tracker.on_fed_eval
    )
    client_app = make_client_app(_client_spec(cfg, data, privacy))
    backend = OmegaConf.to_container(cfg.simulation.backend, resolve=True)
    run_simulation(server_app, client_app, cfg.simulation.num_supernodes, backend, outcome)  # type: ignore[arg-type]
    if outcome.stop_reason:
        print(f"flair-fl: stopped after round {outcome.rounds_done}: {outcome.stop_reason}")
    return tracker.finish(outcome)


class RoundTracker:
    """Per-round bookkeeping in the driver: central eval, best model, loggers, summary."""

    def __init__(
        self,
        cfg: DictConfig,
        evaluator: CentralEvaluator,
        privacy: Privacy,
        loggers: list[RunLogger],
        out: Path,
        started: float,
        initial_val: dict[str, float],
    ):
        self.cfg, self.evaluator, self.privacy, self.loggers = cfg, evaluator, privacy, loggers
        self.out, self.started, self.initial_val = out, started, initial_val
        self.best: dict[str, Any] = {"round": 0, **initial_val}
        self.progress = ConsoleProgress(cfg.num_rounds)

    def on_round(self, server_round: int, arrays: ArrayRecord, metrics: dict[str, Any]) -> bool:
        metrics.update(self.privacy.round_metrics(server_round))
        every = self.cfg.eval_every
        if (every and server_round % every == 0) or server_round == self.cfg.num_rounds:
            metrics.update(self.evaluator(arrays, "val"))
            if metrics["val_macro_ap"] > self.best["val_macro_ap"]:
                self.best = {
                    "round": server_round,
                    **{k: v for k, v in metrics.items() if k.startswith("val_")},
                }
                torch.save(self.evaluator.model.state_dict(), self.out / "model_best.pt")
        metrics["elapsed_s"] = time.perf_counter() - self.started
        self.progress.log_round(server_round, metrics)
        for logger in self.loggers:
            logger.log_round(server_round, metrics)
        return False

    def on_fed_eval(self, server_round: int, replies: list[Message]) -> dict[str, Any]:
        num_labels = self.evaluator.data.num_labels
        total = MetricState.zeros(num_labels)
        for reply in replies:
            record = reply.content.metric_records[METRICS_KEY]
            total = total + metric_state_from_record(record, num_labels)
        return {f"fedval_{k}": v for k, v in total.compute().items()}

    def finish(self, outcome: LoopOutcome) -> dict[str, Any]:
        """Final and test evaluation, model files, summary to loggers and console."""
        final = outcome.arrays
        if final is None:
            final = ArrayRecord(trainable_state(self.evaluator.model))
        summary: dict[str, Any] = {
            "rounds": outcome.rounds_done,
            "stop_reason": outcome.stop_reason,
            "untrained_val_macro_ap": self.initial_val["val_macro_ap"],
            "untrained_val_micro_ap": self.initial_val["val_micro_ap"],
            "best_round": self.best["round"],
            **{f"best_{k}": v for k, v in self.best.items() if k.startswith("val_")},
        }
        summary.update({f"final_{k}": v for k, v in self.evaluator(final, "val").items()})
        torch.save(self.evaluator.model.state_dict(), self.out / "model_final.pt")
        if self.cfg.eval.test_at_end:
            summary.update({f"final_{k}": v for k, v in self.evaluator(final, "test").items()})
        summary.update(
            {f"privacy_{k}": v for k, v in self.privacy.round_metrics(outcome.rounds_done).items()}
        )
        summary["wall_time_s"] = time.perf_counter() - self.started
        for logger in self.loggers:
            logger.log_summary(summary)
            logger.close()
        _print_summary(summary, self.out)
        return summary


def _round_plan(
    cfg: DictConfig, data: FederatedData, train_users: list[str], privacy: Privacy
) -> RoundPlan:
    users_val = list(data.reader.population("val"))
    fed_cohort = min(cfg.eval.federated_cohort, len(users_val))
    return RoundPlan(
        num_rounds=cfg.num_rounds,
        sampler=CohortSampler(train_users, cfg.cohort_size, cfg.seed),
        round_timeout=float(cfg.simulation.round_timeout),
        base_config={"seed": cfg.seed},
        fed_eval_sampler=CohortSampler(users_val, fed_cohort, cfg.seed) if fed_cohort else None,
        fed_eval_every=cfg.eval_every if fed_cohort else 0,
        num_supernodes=cfg.simulation.num_supernodes,
        should_stop=privacy.stop_reason,
    )


def _report_privacy(privacy: Privacy, out: Path) -> None:
    settings = privacy.describe()
    (out / "privacy.json").write_text(json.dumps(settings, indent=2))
    if settings.get("mechanism", "none") != "none":
        print("flair-fl privacy: " + ", ".join(f"{k}={v}" for k, v in settings.items()), flush=True)


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    rows = [
        (
            "val macro AP (untrained -> final)",
            f"{summary['untrained_val_macro_ap']:.4f} -> {summary['final_val_macro_ap']:.4f}",
        ),
        (
            "val micro AP (untrained -> final)",
            f"{summary['untrained_val_micro_ap']:.4f} -> {summary['final_val_micro_ap']:.4f}",
        ),
        (
            "best val macro AP",
            f"{summary['best_val_macro_ap']:.4f} (round {summary['best_round']})",
        ),
    ]
    if "final_test_macro_ap" in summary:
        rows.append(
            (
                "test macro / micro AP (final model)",
                f"{summary['final_test_macro_ap']:.4f} / {summary['final_test_micro_ap']:.4f}",
            )
        )
    rows.append(("wall time", f"{summary['wall_time_s']:.1f} s"))
    width = max(len(k) for k, _ in rows)
    print(
        "\n".join(
            [
                "",
                "flair-fl summary",
                *(f"  {k:<{width}}  {v}" for k, v in rows),
                f"  outputs: {out}",
            ]
        ),
        flush=True,
    )
