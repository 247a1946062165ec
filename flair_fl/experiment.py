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


def _build_strategy(cfg: DictConfig) -> Any:
    if cfg.aggregation not in WEIGHT_KEYS:
        raise ConfigError(
            f"aggregation={cfg.aggregation!r}: expected one of {', '.join(WEIGHT_KEYS)}"
        )
    strategy = build(
        cfg.strategy.server,
        "strategy.server",
        fraction_train=1e-9,  # the strategy's own node sampling is replaced by ours
        min_train_nodes=1,
        min_available_nodes=cfg.simulation.num_supernodes,
        weighted_by_key=WEIGHT_KEYS[cfg.aggregation],
    )
    return build(cfg.privacy, "privacy").wrap(strategy)


def _client_spec(cfg: DictConfig, data: FederatedData) -> ClientSpec:
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

    torch.manual_seed(derive_seed(cfg.seed, "model-init"))
    np.random.seed(derive_seed(cfg.seed, "numpy") % 2**32)
    model = build(cfg.model, "model")(num_classes=data.num_labels)
    initial = ArrayRecord(trainable_state(model))
    device = _device(cfg.device)
    evaluator = CentralEvaluator(model, data, cfg.eval.batch_size, device)
    loggers: list[RunLogger] = [build(node, "logger", out_dir=out) for node in cfg.logger.values()]
    progress = ConsoleProgress(cfg.num_rounds)

    initial_val = evaluator(initial, "val")
    print(
        f"flair-fl: {len(train_users)} train users, cohort {cfg.cohort_size}, "
        f"{cfg.num_rounds} rounds, {data.num_labels} labels ({data.label_set}); "
        f"untrained val macro AP {initial_val['val_macro_ap']:.4f} "
        f"micro AP {initial_val['val_micro_ap']:.4f}",
        flush=True,
    )
    best: dict[str, Any] = {"round": 0, **initial_val}

    def on_round(server_round: int, arrays: ArrayRecord, metrics: dict[str, Any]) -> bool:
        evaluate_now = cfg.eval_every and server_round % cfg.eval_every == 0
        if evaluate_now or server_round == cfg.num_rounds:
            metrics.update(evaluator(arrays, "val"))
            if metrics["val_macro_ap"] > best["val_macro_ap"]:
                best.clear()
                best.update(
                    {
                        "round": server_round,
                        **{k: v for k, v in metrics.items() if k.startswith("val_")},
                    }
                )
                torch.save(model.state_dict(), out / "model_best.pt")
        metrics["elapsed_s"] = time.perf_counter() - started
        progress.log_round(server_round, metrics)
        for logger in loggers:
            logger.log_round(server_round, metrics)
        return False

    def on_fed_eval(server_round: int, replies: list[Message]) -> dict[str, Any]:
        total = MetricState.zeros(data.num_labels)
        for reply in replies:
            total = total + metric_state_from_record(
                reply.content.metric_records[METRICS_KEY],
                data.num_labels,
            )
        return {f"fedval_{k}": v for k, v in total.compute().items()}

    users_val = list(data.reader.population("val"))
    fed_cohort = min(cfg.eval.federated_cohort, len(users_val))
    plan = RoundPlan(
        num_rounds=cfg.num_rounds,
        sampler=CohortSampler(train_users, cfg.cohort_size, cfg.seed),
        round_timeout=float(cfg.simulation.round_timeout),
        base_config={"seed": cfg.seed},
        fed_eval_sampler=CohortSampler(users_val, fed_cohort, cfg.seed) if fed_cohort else None,
        fed_eval_every=cfg.eval_every if fed_cohort else 0,
        num_supernodes=cfg.simulation.num_supernodes,
    )
    outcome = LoopOutcome()
    server_app = make_server_app(
        _build_strategy(cfg), initial, plan, on_round, outcome, on_fed_eval
    )
    client_app = make_client_app(_client_spec(cfg, data))
    backend = OmegaConf.to_container(cfg.simulation.backend, resolve=True)
    run_simulation(server_app, client_app, cfg.simulation.num_supernodes, backend, outcome)  # type: ignore[arg-type]

    final = outcome.arrays or initial
    load_trainable(model, final.to_torch_state_dict())
    torch.save(model.state_dict(), out / "model_final.pt")
    summary: dict[str, Any] = {
        "rounds": outcome.rounds_done,
        "untrained_val_macro_ap": initial_val["val_macro_ap"],
        "untrained_val_micro_ap": initial_val["val_micro_ap"],
        "best_round": best["round"],
        **{f"best_{k}": v for k, v in best.items() if k.startswith("val_")},
    }
    final_val = evaluator(final, "val")
    summary.update({f"final_{k}": v for k, v in final_val.items()})
    if cfg.eval.test_at_end:
        summary.update({f"final_{k}": v for k, v in evaluator(final, "test").items()})
    summary["wall_time_s"] = time.perf_counter() - started
    for logger in loggers:
        logger.log_summary(summary)
        logger.close()
    _print_summary(summary, out)
    return summary


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
    json.dumps(summary)  # fail loudly here, not in a logger, if something is not serialisable
