"""One experiment: build every piece from the config, run the federated loop, report.

`run.py` calls `run_experiment` under Hydra; tests call it with a composed config.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord
from omegaconf import DictConfig, OmegaConf

from flair_fl.algorithms.fedprox import AdaFedProx, AdaptiveMu
from flair_fl.artifacts.checkpoint import (
    CHECKPOINT_NAME,
    differing_keys,
    load_checkpoint,
    save_checkpoint,
)
from flair_fl.artifacts.durable import write_atomically
from flair_fl.artifacts.run_dir import report_finished
from flair_fl.data.source import FederatedData, check_label
from flair_fl.errors import ConfigError, NoRoundTrained, TrainingDiverged
from flair_fl.federated.client_app import ClientSpec, make_client_app
from flair_fl.federated.contract import ServerStrategy, server_strategy
from flair_fl.federated.faults import FaultSpec
from flair_fl.federated.protocol import EXAMPLES_WEIGHT_KEY, UNIFORM_WEIGHT_KEY
from flair_fl.federated.round import LoopOutcome, RoundPlan
from flair_fl.federated.sampling import CohortSampler, Sampler, WithReplacementSampler
from flair_fl.federated.schedule import ScheduledServerLR, ServerLRSchedule
from flair_fl.federated.server_app import make_server_app
from flair_fl.federated.simulation import run_simulation
from flair_fl.federated.transport import make_transport
from flair_fl.learning.evaluator import overlap_enabled
from flair_fl.learning.local_training import LocalTraining
from flair_fl.models.params import trainable_state
from flair_fl.modes.config_checks import validate_run_config
from flair_fl.modes.driver import (
    RoundTracker,
    build,
    build_loggers,
    central_evaluator,
    device_for,
    make_model,
)
from flair_fl.privacy import Privacy, PrivacyContext
from flair_fl.services import stopping
from flair_fl.services.job_resources import sized_init_args
from flair_fl.services.seeds import derive_seed

log = logging.getLogger(__name__)


WEIGHT_KEYS = {"uniform": UNIFORM_WEIGHT_KEY, "examples": EXAMPLES_WEIGHT_KEY}


def _build_strategy(
    cfg: DictConfig, context: PrivacyContext
) -> tuple[ServerStrategy, ScheduledServerLR]:
    """The configured server strategy (as the round's contract) and its server-lr schedule.

    Privacy is not applied to it: it runs as the round's stages (privacy.round_stages)."""
    extra = (
        {"population_size": context.population_size}
        if "population_size" in (cfg.strategy.server)
        else {}
    )
    strategy = server_strategy(
        build(
            cfg.strategy.server, "strategy.server", weighted_by_key=context.weighted_by_key, **extra
        )
    )
    try:
        schedule = ScheduledServerLR(
            strategy, ServerLRSchedule(num_rounds=cfg.num_rounds, **cfg.server_lr_schedule)
        )
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None
    return strategy, schedule


def _adaptive_mu(cfg: DictConfig, strategy: ServerStrategy) -> AdaptiveMu:
    if not isinstance(strategy, AdaFedProx):
        raise ConfigError("strategy.adaptive_mu: only strategy=adafedprox adapts its mu")
    try:
        return AdaptiveMu(strategy, **cfg.strategy.adaptive_mu)
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None


def client_spec(cfg: DictConfig, data: FederatedData, privacy: Privacy, out: Path) -> ClientSpec:
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
            precision=str(client.get("precision", "fp32")),
            channels_last=bool(client.get("channels_last", False)),
        ),
        max_images=client.max_images,
        seed=cfg.seed,
        use_gpu=cfg.device != "cpu" and float(resources.get("num_gpus", 0)) > 0,
        num_threads=int(resources.get("num_cpus", 1)),
        eval_batch_size=cfg.eval.batch_size,
        eval_precision=str(cfg.eval.get("precision", "fp32")),
        local_dp=privacy.client_settings(),
        label_index=data.label_index,
        state_dir=str((out / "client_state").resolve()),
        reader_settings=data.reader_settings(),
        faults=fault_spec(cfg),
        gpu_fraction=float(resources.get("num_gpus", 0)),
    )


def fault_spec(cfg: DictConfig) -> FaultSpec:
    node = cfg.client.get("faults") or {}
    try:
        return FaultSpec(
            probability=float(node.get("probability", 0.0)),
            kinds=tuple(str(k) for k in node.get("kinds", FaultSpec.kinds)),  # YAML: nan is a float
            hang_s=float(node.get("hang_s", FaultSpec.hang_s)),
            start_round=int(node.get("start_round", 1)),
            seed=cfg.seed,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None


def run_experiment(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Run one configured experiment; returns the summary (also written to summary.json)."""
    started = time.perf_counter()
    if cfg.get("resume") and (done := report_finished(Path(cfg.resume))) is not None:
        return done
    checkpoint = load_checkpoint(cfg.resume) if cfg.get("resume") else None
    out = Path(cfg.resume) if checkpoint else Path(output_dir)  # a resumed run continues there
    out.mkdir(parents=True, exist_ok=True)
    validate_run_config(cfg)
    if checkpoint and (changed := differing_keys(checkpoint["config"], _container(cfg))):
        raise ConfigError(
            f"resume={cfg.resume}: the config differs from the checkpoint's in "
            f"{', '.join(changed)}; resume with the run's own settings"
        )
    data: FederatedData = build(cfg.data, "data")
    data.require_splits("train", "val", *(["test"] if cfg.eval.test_at_end else []))
    check_label(data)
    train_users = list(data.reader.population("train"))
    validate_run_config(cfg, num_train_users=len(train_users))
    write_atomically(out / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))
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
    strategy, lr_schedule = _build_strategy(cfg, context)
    round_privacy = privacy.round_stages(context)
    _report_privacy(privacy, out)

    torch.manual_seed(derive_seed(cfg.seed, "model-init"))
    np.random.seed(derive_seed(cfg.seed, "numpy") % 2**32)
    model = make_model(cfg, data.num_labels)
    privacy.check_model(model)  # e.g. DP-SGD refuses BatchNorm here, not in every client
    initial = ArrayRecord(trainable_state(model))
    if checkpoint:
        initial = ArrayRecord(checkpoint["arrays"])
        strategy.load_state_dict(checkpoint["strategy"])
        privacy.load_state_dict(checkpoint["privacy"])
    device = device_for(cfg.device)
    evaluator = central_evaluator(cfg, model, data, device)
    loggers = build_loggers(cfg, out)
    initial_val = checkpoint["initial_val"] if checkpoint else evaluator(initial, "val")
    if not checkpoint:
        for logger in loggers:
            logger.log_untrained(initial_val)
    print(
        f"flair-fl: {len(train_users)} train users, cohort {cfg.cohort_size}, "
        f"{cfg.num_rounds} rounds, {data.num_labels} labels ({data.label_set}); untrained "
        f"val macro AP {initial_val['val_macro_ap']:.4f} micro AP "
        f"{initial_val['val_micro_ap']:.4f}",
        flush=True,
    )
    tracker = RoundTracker(
        cfg.num_rounds,
        cfg.eval_every,
        evaluator,
        privacy,
        loggers,
        out,
        initial_val,
        test_at_end=cfg.eval.test_at_end,
        checkpoint_every=cfg.checkpoint_every,
        # adafedprox adapts round r+1's mu on round r's val metrics: evaluated in line
        overlap=overlap_enabled(cfg.eval.get("overlap", "auto"), device)
        and "adaptive_mu" not in cfg.strategy,
    )
    tracker.started = started
    if "adaptive_mu" in cfg.strategy:  # strategy=adafedprox
        tracker.adaptive_mu = _adaptive_mu(cfg, strategy)
        if not checkpoint:
            tracker.adaptive_mu.observe(0, initial_val)  # the untrained model's val loss
    tracker.checkpoint = _Checkpointer(cfg, out, strategy, privacy, tracker)
    start_round = 1
    if checkpoint:
        start_round = checkpoint["round"] + 1
        tracker.resume(checkpoint["tracker"], checkpoint["round"])
        tracker.checkpointed_round = checkpoint["round"]
        print(f"flair-fl: resuming {out} after round {checkpoint['round']}", flush=True)

    plan = _round_plan(cfg, data, train_users, privacy)
    plan.before_round = lr_schedule.before_round
    plan.transport.check_room(sum(a.numpy().nbytes for a in initial.values()))
    # Until a round is done, the model is the one the run starts from (the checkpoint's).
    outcome = LoopOutcome(arrays=initial, rounds_done=start_round - 1)
    server_app = make_server_app(
        strategy,
        round_privacy,
        initial,
        plan,
        tracker.on_round,
        outcome,
        tracker.on_fed_eval,
        start_round,
    )
    client_app = make_client_app(client_spec(cfg, data, privacy, out))
    backend = cast(dict[str, Any], OmegaConf.to_container(cfg.simulation.backend, resolve=True))
    # A Ray this run starts gets the job's CPUs (SLURM, taskset), not the node's.
    backend["init_args"] = sized_init_args(backend.get("init_args") or {})
    client_timeout = cfg.simulation.get("client_timeout") or cfg.simulation.round_timeout
    if start_round <= cfg.num_rounds:
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
    else:  # killed after its last checkpoint: only the final evaluation is left
        print(f"flair-fl: all {cfg.num_rounds} rounds were done; final evaluation", flush=True)
    tracker.settle()  # book the last round's background evaluation
    if outcome.diverged or tracker.diverged:
        reason = outcome.stop_reason or tracker.diverged
        tracker.abandon(outcome, str(reason))
        kept = (
            f"the last checkpoint ({out / CHECKPOINT_NAME}, round {tracker.checkpointed_round}) "
            "holds a model from before the divergence"
            if tracker.checkpointed_round
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
        raise tracker.stopped(outcome, stop, resume_hint=f"python -m flair_fl.run resume={out}")
    if outcome.stop_reason:
        print(f"flair-fl: stopped after round {outcome.rounds_done}: {outcome.stop_reason}")
    return tracker.finish(outcome)


def _container(cfg: DictConfig) -> dict[str, Any]:
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    return container  # type: ignore[return-value]


class _Checkpointer:
    """Saves `out/checkpoint.pt` for a round: weights, strategy, privacy, tracker, config.

    `snapshot` captures the server's state at the end of a round and writes it later (with
    an overlapped evaluation, once the round's evaluation is in and booked): the strategy and
    privacy states are copied, as the next round changes them in place.
    """

    def __init__(
        self,
        cfg: DictConfig,
        out: Path,
        strategy: ServerStrategy,
        privacy: Privacy,
        tracker: RoundTracker,
    ):
        self.config = _container(cfg)
        self.config.pop("resume", None)
        self.out, self.strategy, self.privacy, self.tracker = out, strategy, privacy, tracker

    def snapshot(self, server_round: int, arrays: ArrayRecord) -> Callable[[], None]:
        state = {
            "round": server_round,
            "arrays": dict(arrays.to_torch_state_dict()),
            "strategy": copy.deepcopy(self.strategy.state_dict()),
            "privacy": copy.deepcopy(self.privacy.state_dict()),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()},
        }

        def write() -> None:
            tracker = self.tracker
            for logger in tracker.loggers:  # first: what the checkpoint covers is logged for good
                flush = getattr(logger, "flush", None)
                if flush is not None:
                    flush()
            save_checkpoint(
                {
                    **state,
                    "tracker": tracker.state_dict(),
                    "initial_val": tracker.initial_val,
                    "config": self.config,
                },
                self.out / CHECKPOINT_NAME,
            )
            tracker.checkpointed_round = server_round

        return write

    def __call__(self, server_round: int, arrays: ArrayRecord) -> None:
        self.snapshot(server_round, arrays)()


def _round_plan(
    cfg: DictConfig, data: FederatedData, train_users: list[str], privacy: Privacy
) -> RoundPlan:
    faults = fault_spec(cfg)
    users_val = list(data.reader.population("val"))
    fed_cohort = min(cfg.eval.federated_cohort, len(users_val))
    sim = cfg.simulation
    try:
        transport = make_transport(sim.get("transport", "shared"), sim.get("shared_dir"))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return RoundPlan(
        transport=transport,
        min_replies=int(cfg.get("min_replies", 1)),
        num_rounds=cfg.num_rounds,
        sampler=_sampler(cfg, train_users, privacy),
        round_timeout=float(cfg.simulation.round_timeout),
        base_config={"seed": cfg.seed},
        fed_eval_sampler=CohortSampler(users_val, fed_cohort, cfg.seed) if fed_cohort else None,
        fed_eval_every=cfg.eval_every if fed_cohort else 0,
        num_supernodes=cfg.simulation.num_supernodes,
        should_stop=privacy.stop_reason,
        fault_of=faults.draw if faults.probability > 0 else None,
    )


def _sampler(cfg: DictConfig, train_users: list[str], privacy: Privacy | None = None) -> Sampler:
    """The configured cohort sampler (`sampler` group) over the train users, or the one
    the privacy mechanism's guarantee needs (`privacy=dp_bmf`: min-separation)."""
    required = privacy.make_sampler(train_users, cfg.cohort_size, cfg.seed) if privacy else None
    if required is not None:
        if str(cfg.sampler.get("_target_", "")).endswith("WithReplacementSampler"):
            raise ConfigError(
                "sampler=with_replacement: privacy=dp_bmf samples min-separated cohorts "
                "itself (privacy.min_separation); use the default sampler"
            )
        return cast(Sampler, required)
    factory = build(cfg.sampler, "sampler")
    try:
        sampler: Sampler = factory(train_users, cfg.cohort_size, cfg.seed)
    except ValueError as err:
        raise ConfigError(f"sampler: {err}") from None
    mechanism = str(privacy.describe().get("mechanism", "none")) if privacy else "none"
    if isinstance(sampler, WithReplacementSampler) and mechanism.startswith("central-dp"):
        log.warning(
            "sampler=with_replacement with %s: the printed epsilon assumes a user contributes "
            "at most once per round; drawn with replacement, a user drawn twice contributes "
            "twice, which it does not cover (pfl-research's sampler has the same gap)",
            mechanism,
        )
    return sampler


def _report_privacy(privacy: Privacy, out: Path) -> None:
    settings = privacy.describe()
    write_atomically(out / "privacy.json", json.dumps(settings, indent=2))
    if settings.get("mechanism", "none") != "none":
        print("flair-fl privacy: " + ", ".join(f"{k}={v}" for k, v in settings.items()), flush=True)
