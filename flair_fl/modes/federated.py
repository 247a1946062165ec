"""One federated experiment: build every piece from the config, run the rounds, report.

`run.py` calls `run_experiment` under Hydra; tests call it with a composed config. The
pieces come from modes/build.py; the after-round work is federated/callbacks.py's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord
from omegaconf import DictConfig, OmegaConf

from flair_fl.artifacts.checkpoint import differing_keys, load_checkpoint
from flair_fl.artifacts.durable import write_atomically
from flair_fl.artifacts.run_dir import report_finished
from flair_fl.data.source import FederatedData, check_label
from flair_fl.errors import ConfigError, NoRoundTrained, RunStopped, TrainingDiverged
from flair_fl.federated.callbacks import Checkpoint, RoundTracker
from flair_fl.federated.client_app import make_client_app
from flair_fl.federated.contract import ServerStrategy
from flair_fl.federated.round import LoopOutcome
from flair_fl.federated.server_app import make_server_app
from flair_fl.federated.simulation import run_simulation
from flair_fl.models.params import trainable_state
from flair_fl.modes.build import (
    build,
    build_loggers,
    build_strategy,
    central_evaluator,
    client_spec,
    config_dict,
    device_for,
    federated_tracker,
    make_model,
    privacy_context,
    round_plan,
)
from flair_fl.modes.config_checks import validate_run_config
from flair_fl.privacy import Privacy
from flair_fl.services import stopping
from flair_fl.services.job_resources import sized_init_args
from flair_fl.services.seeds import derive_seed


def run_experiment(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Run one configured experiment; returns the summary (also written to summary.json)."""
    started = time.perf_counter()
    # 1. run dir: a finished run is reported as it is; a resumed one continues in its dir
    if cfg.get("resume") and (done := report_finished(Path(cfg.resume))) is not None:
        return done
    checkpoint = load_checkpoint(cfg.resume) if cfg.get("resume") else None
    out = Path(cfg.resume) if checkpoint else Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # 2. config checks (again with the population size once the data is open)
    _check_config(cfg, checkpoint)
    data = _open_data(cfg)
    train_users = list(data.reader.population("train"))
    validate_run_config(cfg, num_train_users=len(train_users))
    write_atomically(out / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    # 3. privacy and the server strategy it wraps
    context = privacy_context(cfg, population_size=len(train_users))
    privacy: Privacy = build(cfg.privacy, "privacy")
    strategy, lr_schedule = build_strategy(cfg, context)
    round_privacy = privacy.round_stages(context)
    _report_privacy(privacy, out)
    # 4. the initial model (seeded), or the checkpoint's model and server state
    model, initial = _initial_model(cfg, data, privacy, strategy, checkpoint)
    # 5. central evaluation, loggers and the untrained model's val metrics
    evaluator = central_evaluator(cfg, model, data, device_for(cfg.device))
    loggers = build_loggers(cfg, out)
    initial_val = checkpoint["initial_val"] if checkpoint else evaluator(initial, "val")
    if not checkpoint:
        for logger in loggers:
            logger.log_untrained(initial_val)
    _print_start(cfg, data, len(train_users), initial_val)
    # 6. after-round work (evaluation, best model, loggers, checkpoint), resumed if asked
    tracker, saver = federated_tracker(
        cfg, evaluator, privacy, strategy, loggers, out, initial_val, started
    )
    start_round = 1
    if checkpoint:
        start_round = checkpoint["round"] + 1
        tracker.resume(checkpoint["tracker"], checkpoint["round"])
        print(f"flair-fl: resuming {out} after round {checkpoint['round']}", flush=True)
    # 7. the rounds, in Flower's simulation (none left: killed after the last checkpoint)
    plan = round_plan(cfg, data, train_users, privacy, lr_schedule)
    plan.transport.check_room(sum(a.numpy().nbytes for a in initial.values()))
    # Until a round is done, the model is the one the run starts from (the checkpoint's).
    outcome = LoopOutcome(arrays=initial, rounds_done=start_round - 1)
    # the loop calls the tracker after each round and writes its results into `outcome`
    hooks = (tracker.after_round, outcome, tracker.on_fed_eval, start_round)
    server_app = make_server_app(strategy, round_privacy, initial, plan, *hooks)
    client_app = make_client_app(client_spec(cfg, data, privacy, out))
    if start_round <= cfg.num_rounds:
        _simulate(cfg, server_app, client_app, outcome)
    else:
        print(f"flair-fl: all {cfg.num_rounds} rounds were done; final evaluation", flush=True)
    # 8. the outcome: diverged, nothing trained or stopped by a signal raise; else finish
    return _conclude(cfg, out, tracker, saver, outcome)


def _check_config(cfg: DictConfig, checkpoint: dict[str, Any] | None) -> None:
    validate_run_config(cfg)
    if checkpoint and (changed := differing_keys(checkpoint["config"], config_dict(cfg))):
        raise ConfigError(
            f"resume={cfg.resume}: the config differs from the checkpoint's in "
            f"{', '.join(changed)}; resume with the run's own settings"
        )


def _open_data(cfg: DictConfig) -> FederatedData:
    data: FederatedData = build(cfg.data, "data")
    data.require_splits("train", "val", *(["test"] if cfg.eval.test_at_end else []))
    check_label(data)
    return data


def _initial_model(
    cfg: DictConfig,
    data: FederatedData,
    privacy: Privacy,
    strategy: ServerStrategy,
    checkpoint: dict[str, Any] | None,
) -> tuple[torch.nn.Module, ArrayRecord]:
    """The model (seeded) and the weights the run starts from: its own initial ones, or
    the checkpoint's (the strategy's and privacy's state then come back too)."""
    torch.manual_seed(derive_seed(cfg.seed, "model-init"))
    np.random.seed(derive_seed(cfg.seed, "numpy") % 2**32)
    model = make_model(cfg, data.num_labels)
    privacy.check_model(model)  # e.g. DP-SGD refuses BatchNorm here, not in every client
    initial = ArrayRecord(trainable_state(model))
    if checkpoint:
        initial = ArrayRecord(checkpoint["arrays"])
        strategy.load_state_dict(checkpoint["strategy"])
        privacy.load_state_dict(checkpoint["privacy"])
    return model, initial


def _print_start(
    cfg: DictConfig, data: FederatedData, num_users: int, initial_val: dict[str, float]
) -> None:
    print(
        f"flair-fl: {num_users} train users, cohort {cfg.cohort_size}, "
        f"{cfg.num_rounds} rounds, {data.num_labels} labels ({data.label_set}); untrained "
        f"val macro AP {initial_val['val_macro_ap']:.4f} micro AP "
        f"{initial_val['val_micro_ap']:.4f}",
        flush=True,
    )


def _simulate(cfg: DictConfig, server_app: Any, client_app: Any, outcome: LoopOutcome) -> None:
    backend = cast(dict[str, Any], OmegaConf.to_container(cfg.simulation.backend, resolve=True))
    # A Ray this run starts gets the job's CPUs (SLURM, taskset), not the node's.
    backend["init_args"] = sized_init_args(backend.get("init_args") or {})
    client_timeout = cfg.simulation.get("client_timeout") or cfg.simulation.round_timeout
    run_simulation(
        server_app,
        client_app,
        cfg.simulation.num_supernodes,
        backend,
        outcome,
        client_timeout=float(client_timeout),
        actor_start_timeout=float(cfg.simulation.get("actor_start_timeout", 120)),
        actor_niceness=cfg.simulation.get("actor_niceness"),
    )


def _conclude(
    cfg: DictConfig, out: Path, tracker: RoundTracker, saver: Checkpoint, outcome: LoopOutcome
) -> dict[str, Any]:
    """Finish the run, or end it with the error that says why it failed or stopped."""
    tracker.settle()  # book the last round's background evaluation
    if outcome.diverged or tracker.diverged:
        reason = outcome.stop_reason or tracker.diverged
        tracker.abandon(outcome, str(reason))
        kept = (
            f"the last checkpoint ({saver.path}, round {saver.saved_round}) "
            "holds a model from before the divergence"
            if saver.saved_round
            else f"no checkpoint was written before it (checkpoint_every={cfg.checkpoint_every})"
        )
        raise TrainingDiverged(f"{reason}. Metrics up to the last good round are in {out}; {kept}.")
    if outcome.rounds_run and outcome.rounds_skipped == outcome.rounds_run:
        failed = ", ".join(f"{n} {kind}" for kind, n in outcome.failures.items() if n)
        reason = (
            f"every round ({outcome.rounds_run}) was skipped: fewer than "
            f"min_replies={cfg.min_replies} usable client updates (client failures: "
            f"{failed or 'none'}; see the warnings above); the model was never updated"
        )
        tracker.abandon(outcome, reason, diverged=False)
        raise NoRoundTrained(f"{reason}. Metrics are in {out}.")
    if (stop := stopping.requested()) is not None:
        tracker.stopped(outcome)  # the last completed round is checkpointed first
        kept = (
            f"checkpoint of round {saver.saved_round} kept; continue with "
            f"`python -m flair_fl.run resume={out}`"
            if saver.saved_round
            else "no round was checkpointed (nothing to resume)"
        )
        raise RunStopped(stop, f"after round {outcome.rounds_done} of {cfg.num_rounds}; {kept}")
    if outcome.stop_reason:
        print(f"flair-fl: stopped after round {outcome.rounds_done}: {outcome.stop_reason}")
    return tracker.finish(outcome)


def _report_privacy(privacy: Privacy, out: Path) -> None:
    settings = privacy.describe()
    write_atomically(out / "privacy.json", json.dumps(settings, indent=2))
    if settings.get("mechanism", "none") != "none":
        print("flair-fl privacy: " + ", ".join(f"{k}={v}" for k, v in settings.items()), flush=True)
