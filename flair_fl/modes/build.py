"""Factories from the config: every piece a run is made of, built with errors that name
the config key (data, model, loggers, central evaluator, strategy and its server-lr
schedule, cohort sampler, round plan, client spec, the after-round tracker).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from flair_fl.algorithms.fedprox import AdaFedProx, AdaptiveMu
from flair_fl.data.source import FederatedData
from flair_fl.errors import ConfigError, FlairFormatError
from flair_fl.federated.callbacks import (
    AdaptMu,
    BestModel,
    Callback,
    CentralEval,
    Checkpoint,
    LogRounds,
    PrivacyMetrics,
    RoundTracker,
)
from flair_fl.federated.client_app import ClientSpec
from flair_fl.federated.contract import ServerStrategy, server_strategy
from flair_fl.federated.faults import FaultSpec
from flair_fl.federated.round import RoundPlan
from flair_fl.federated.sampling import (
    CohortSampler,
    MinSeparationSampler,
    Sampler,
    WithReplacementSampler,
)
from flair_fl.federated.schedule import ScheduledServerLR, ServerLRSchedule
from flair_fl.federated.transport import make_transport
from flair_fl.learning.evaluator import CentralEvaluator, overlap_enabled
from flair_fl.learning.local_training import LocalTraining
from flair_fl.loggers import LoggerErrors, SafeLogger, start_logger
from flair_fl.privacy import Privacy, PrivacyContext
from flair_fl.protocol import EXAMPLES_WEIGHT_KEY, UNIFORM_WEIGHT_KEY

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


def config_dict(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain data."""
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    return container  # type: ignore[return-value]


def build_loggers(cfg: DictConfig, out: Path) -> list[SafeLogger]:
    """Every logger of the `logger` group; each gets the run dir and the resolved config.

    Each runs behind a `SafeLogger`: a logger that fails is reported and counted in
    `summary["logger_errors"]`, and the run goes on.
    """
    run_config = OmegaConf.to_container(cfg, resolve=True)
    errors = LoggerErrors()
    loggers: list[SafeLogger] = []
    for name, node in cfg.logger.items():
        factory = build(node, f"logger.{name}", _partial_=True)  # run_config is data, not config
        loggers.append(start_logger(str(name), factory, errors, out_dir=out, run_config=run_config))
    return loggers


def make_model(cfg: DictConfig, num_labels: int) -> torch.nn.Module:
    """The configured model with `num_labels` outputs (errors name the model keys)."""
    factory = build(cfg.model, "model")
    try:
        model: torch.nn.Module = factory(num_classes=num_labels)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from None
    return model


def device_for(name: str) -> torch.device:
    """The driver's device for `device=auto|cpu|cuda`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def central_evaluator(
    cfg: DictConfig, model: torch.nn.Module, data: Any, device: torch.device
) -> CentralEvaluator:
    """The run's central evaluator (the `eval` group: batch, precision, where data lives)."""
    node = cfg.eval
    return CentralEvaluator(
        model,
        data,
        int(node.batch_size),
        device,
        precision=str(node.get("precision", "fp32")),
        placement=str(node.get("data_on", "auto")),
    )


def privacy_context(cfg: DictConfig, population_size: int) -> PrivacyContext:
    """What a privacy mechanism needs to know of the run (cohort, population, weights)."""
    if cfg.aggregation not in WEIGHT_KEYS:
        raise ConfigError(
            f"aggregation={cfg.aggregation!r}: expected one of {', '.join(WEIGHT_KEYS)}"
        )
    return PrivacyContext(
        cohort_size=cfg.cohort_size,
        population_size=population_size,
        num_rounds=cfg.num_rounds,
        seed=cfg.seed,
        weighted_by_key=WEIGHT_KEYS[cfg.aggregation],
    )


def build_strategy(
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


def adaptive_mu(cfg: DictConfig, strategy: ServerStrategy) -> AdaptiveMu | None:
    """strategy=adafedprox's mu adaptation (None for the other strategies)."""
    if "adaptive_mu" not in cfg.strategy:
        return None
    if not isinstance(strategy, AdaFedProx):
        raise ConfigError("strategy.adaptive_mu: only strategy=adafedprox adapts its mu")
    try:
        return AdaptiveMu(strategy, **cfg.strategy.adaptive_mu)
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None


def fault_spec(cfg: DictConfig) -> FaultSpec:
    """The clients' seeded fault injection (`client.faults`; off by default)."""
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


def client_spec(cfg: DictConfig, data: FederatedData, privacy: Privacy, out: Path) -> ClientSpec:
    """Everything a ClientApp needs, as plain config (shipped with every message)."""
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


def round_plan(
    cfg: DictConfig,
    data: FederatedData,
    train_users: list[str],
    privacy: Privacy,
    lr_schedule: ScheduledServerLR,
) -> RoundPlan:
    """How the loop runs its rounds: sampler, transport, timeouts, federated evaluation."""
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
        sampler=make_sampler(cfg, train_users, privacy),
        round_timeout=float(cfg.simulation.round_timeout),
        base_config={"seed": cfg.seed},
        fed_eval_sampler=CohortSampler(users_val, fed_cohort, cfg.seed) if fed_cohort else None,
        fed_eval_every=cfg.eval_every if fed_cohort else 0,
        num_supernodes=cfg.simulation.num_supernodes,
        should_stop=privacy.stop_reason,
        fault_of=faults.draw if faults.probability > 0 else None,
        before_round=lr_schedule.before_round,
    )


def make_sampler(
    cfg: DictConfig, train_users: list[str], privacy: Privacy | None = None
) -> Sampler:
    """The configured cohort sampler (`sampler` group) over the train users, or the one
    the privacy mechanism's guarantee needs (`privacy=dp_bmf`: min-separation)."""
    separation = privacy.required_separation() if privacy else None
    if separation is not None:
        if str(cfg.sampler.get("_target_", "")).endswith("WithReplacementSampler"):
            raise ConfigError(
                "sampler=with_replacement: privacy=dp_bmf samples min-separated cohorts "
                "itself (privacy.min_separation); use the default sampler"
            )
        try:
            return MinSeparationSampler(train_users, cfg.cohort_size, cfg.seed, separation)
        except ValueError as err:
            raise ConfigError(f"privacy.min_separation={separation}: {err}") from None
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


def federated_tracker(
    cfg: DictConfig,
    evaluator: CentralEvaluator,
    privacy: Privacy,
    strategy: ServerStrategy,
    loggers: list[SafeLogger],
    out: Path,
    initial_val: dict[str, float],
    started: float,
) -> tuple[RoundTracker, Checkpoint]:
    """The federated run's after-round work (federated/callbacks.py) and its checkpointer."""
    mu = adaptive_mu(cfg, strategy)
    # adafedprox adapts round r+1's mu on round r's val metrics: evaluated in line
    overlap = overlap_enabled(cfg.eval.get("overlap", "auto"), evaluator.device) and mu is None
    logs = LogRounds(loggers, cfg.num_rounds, started)
    best = BestModel(evaluator, out, test_at_end=cfg.eval.test_at_end)
    adapt: list[Callback] = [] if mu is None else [AdaptMu(mu, initial_val)]
    config = config_dict(cfg)
    config.pop("resume", None)
    checkpoint = Checkpoint(
        out,
        cfg.checkpoint_every,
        config,
        strategy,
        privacy,
        keeps=[best, *adapt],
        logs=logs,
        initial_val=initial_val,
    )
    tracker = RoundTracker(
        CentralEval(evaluator, cfg.eval_every, cfg.num_rounds, overlap=overlap),
        [PrivacyMetrics(privacy), *adapt, best, logs, checkpoint],
        initial_val,
        out,
        started,
        test_at_end=cfg.eval.test_at_end,
    )
    return tracker, checkpoint
