"""Validate a composed run config before anything starts; every message names the key.

One table (`BOUNDS`) holds the type and range of every numeric key of conf/, with where a
bound comes from; a key a chosen group does not have is skipped. On top of it:

- every number anywhere in the config must be finite (inf / nan never mean "no limit");
- unknown keys of the plain sections (`+client.foo=1`, `+eval.x=2`, `+simulation.y=3`):
  the known ones are those the files under conf/ define. Nodes with a `_target_` are left
  to their constructors, which name an unexpected keyword;
- combinations the code does not support (`COMBINATIONS`);
- GPUs the config asks for but the machine lacks (`check_devices`, after the rest: it is
  the only check that imports torch).

All problems are reported at once, in one line. This module imports no torch, Ray or Flower.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from flair_fl.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
INT, NUMBER = "int", "number"


@dataclass(frozen=True)
class Bound:
    """`key` must be of `kind` in [low, high] (`open_low`: (low, ...); `open_high`:
    (..., high)). `high` may name a limit instead (`limits` of `check_config`, e.g. the
    number of train users, or another key such as cohort_size)."""

    key: str
    kind: str
    low: float | None = None
    high: float | str | None = None
    open_low: bool = False
    open_high: bool = False
    allow_none: bool = False


B = Bound
BOUNDS: tuple[Bound, ...] = (
    B("seed", INT, 0),
    B("num_rounds", INT, 1),
    B("cohort_size", INT, 1, "train users"),
    B("eval_every", INT, 0),
    B("checkpoint_every", INT, 0),
    B("min_replies", INT, 1, "cohort_size"),
    B("server_lr_schedule.warmup_rounds", INT, 0),  # longer than the run: a warning (schedule.py)
    B("server_lr_schedule.final_factor", NUMBER, 0, 1),
    B("server_lr_schedule.lr_end", NUMBER, 0),
    B("server_lr_schedule.training_steps", INT, 1, allow_none=True),
    B("server_lr_schedule.power", NUMBER, 0, open_low=True),
    B("client.epochs", INT, 1),
    B("client.batch_size", INT, 1),
    B("client.lr", NUMBER, 0, open_low=True),
    B("client.momentum", NUMBER, 0, 1, open_high=True),
    B("client.grad_clip", NUMBER, 0, open_low=True, allow_none=True),
    B("client.max_images", INT, 1, allow_none=True),
    B("client.faults.probability", NUMBER, 0, 1),
    B("client.faults.hang_s", NUMBER, 0, open_low=True),
    B("client.faults.start_round", INT, 1),
    B("eval.batch_size", INT, 1),
    B("eval.federated_cohort", INT, 0),
    B("simulation.num_supernodes", INT, 1),
    B("simulation.round_timeout", NUMBER, 0, open_low=True),
    B("simulation.client_timeout", NUMBER, 0, open_low=True, allow_none=True),
    B("simulation.actor_start_timeout", NUMBER, 0),
    B("simulation.actor_niceness", INT, 0, 19, allow_none=True),  # Linux nice; < 0 needs root
    B("simulation.backend.client_resources.num_cpus", NUMBER, 0, open_low=True),
    B("simulation.backend.client_resources.num_gpus", NUMBER, 0),
    B("data.num_users", INT, 1),  # the synthetic generator itself asks for >= 3 (one per split)
    B("data.image_size", INT, 1),
    B("data.seed", INT, 0),
    B("data.fine_per_coarse", INT, 0),
    B("data.iid_user_size", INT, 1),
    B("data.iid_seed", INT, 0),
    B("data.input_size", INT, 1, allow_none=True),
    B("model.groups", INT, 1),
    B("model.width", INT, 1),
    B("strategy.proximal_mu", NUMBER, 0),
    B("strategy.adaptive_mu.every", INT, 1),
    B("strategy.adaptive_mu.step", NUMBER, 0, 1, open_low=True),
    B("strategy.adaptive_mu.decrease_after", INT, 1),
    B("strategy.server.lr", NUMBER, 0, open_low=True),
    B("strategy.server.eta", NUMBER, 0, open_low=True),
    B("strategy.server.eta_l", NUMBER, 0, open_low=True),
    B("strategy.server.tau", NUMBER, 0, open_low=True),
    B("strategy.server.beta_1", NUMBER, 0, 1, open_high=True),
    B("strategy.server.beta_2", NUMBER, 0, 1, open_high=True),
    B("strategy.server.server_learning_rate", NUMBER, 0, open_low=True),
    B("strategy.server.server_momentum", NUMBER, 0, 1, open_high=True),
    B("strategy.server.optimizer.eps", NUMBER, 0, open_low=True),
    B("strategy.server.optimizer.betas.0", NUMBER, 0, 1, open_high=True),
    B("strategy.server.optimizer.betas.1", NUMBER, 0, 1, open_high=True),
    B("strategy.server.population_size", INT, 1, allow_none=True),
    B("privacy.clip_norm", NUMBER, 0, open_low=True),
    B("privacy.epsilon", NUMBER, 0, open_low=True, allow_none=True),
    B("privacy.delta", NUMBER, 0, 1, open_low=True, open_high=True, allow_none=True),
    B("privacy.noise_multiplier", NUMBER, 0, open_low=True, allow_none=True),
    B("privacy.epsilon_tolerance", NUMBER, 0, open_low=True),
    B("privacy.noise_cohort_size", INT, 1, allow_none=True),
    B("privacy.population_size", INT, 1, allow_none=True),
    B("privacy.max_epsilon", NUMBER, 0, open_low=True, allow_none=True),
    B("privacy.max_grad_norm", NUMBER, 0, open_low=True),
    B("privacy.min_separation", INT, 1),
    B("privacy.bands", INT, 1, "privacy.min_separation", allow_none=True),
    B("sampler.min_separation", INT, 1),
    B("privacy.batch_size", INT, 1),
    B("privacy.adaptive.target_unclipped_quantile", NUMBER, 0, 1),
    B("privacy.adaptive.learning_rate", NUMBER, 0, open_low=True),
    B("privacy.adaptive.clipped_count_stddev", NUMBER, 0, open_low=True, allow_none=True),
    B("mode.epochs", INT, 1),
    B("mode.batch_size", INT, 1),
    B("mode.shuffle_buffer", INT, 1),
    B("mode.grad_clip", NUMBER, 0, open_low=True, allow_none=True),
    B("mode.optimizer.lr", NUMBER, 0, open_low=True),
)
CHOICES: dict[str, tuple[str, ...]] = {
    "device": ("auto", "cpu", "cuda"),
    "aggregation": ("uniform", "examples"),
    "client.precision": ("fp32", "bf16"),
    "eval.precision": ("fp32", "bf16"),
    "eval.data_on": ("auto", "device", "host"),
    "eval.overlap": ("auto", "true", "false"),  # YAML true/false arrive as bools
    "data.label_set": ("coarse", "fine"),
    "data.partition": ("natural", "iid"),
    "simulation.transport": ("shared", "message"),
    "strategy.adaptive_mu.metric": ("val_loss",),
}
# Plain sections checked for unknown keys, with the conf/ files that define their keys
# (None: conf/config.yaml). Free-form nodes (ray.init arguments) are not checked.
SECTIONS: dict[str, str | None] = {
    "": None,
    "client": None,
    "client.faults": None,
    "eval": None,
    "server_lr_schedule": None,
    "strategy": "strategy",
    "strategy.adaptive_mu": "strategy",
    "simulation": "simulation",
    "simulation.backend": "simulation",
    "simulation.backend.client_resources": "simulation",
}
RAY_RESOURCES = ("num_cpus", "num_gpus", "memory", "resources", "accelerator_type")


def _target(cfg: DictConfig, key: str) -> str:
    node = OmegaConf.select(cfg, key)
    return str(node.get("_target_", "")) if isinstance(node, DictConfig) else ""


def _central_dp(cfg: DictConfig) -> bool:
    """Central DP of any kind (dp, dp_adaptive, dp_bmf): the server clips users' updates."""
    node = cfg.get("privacy")
    return isinstance(node, DictConfig) and "clip_norm" in node


def _federated(cfg: DictConfig) -> bool:
    return _target(cfg, "mode").endswith("run_experiment")


def _adaptive_mu_unevaluated(cfg: DictConfig) -> bool:
    """strategy.adaptive_mu adapts at rounds the central evaluation does not run."""
    found, every = _present(cfg, "strategy.adaptive_mu.every")
    eval_every = cfg.get("eval_every")
    if not found or not isinstance(every, int) or not isinstance(eval_every, int):
        return False
    return eval_every <= 0 or every % eval_every != 0


# (applies, message): combinations the code refuses (each would fail after Ray started, or
# silently give what was not asked for).
COMBINATIONS: tuple[tuple[Callable[[DictConfig], bool], str], ...] = (
    (
        lambda c: _central_dp(c) and _target(c, "strategy.server").endswith("Scaffold"),
        "privacy=dp/dp_adaptive/dp_bmf with strategy=scaffold: central DP clips and noises model "
        "weights only, SCAFFOLD's control variates would bypass it; use another strategy",
    ),
    (
        lambda c: _central_dp(c) and c.get("aggregation") == "examples",
        "privacy=dp/dp_adaptive/dp_bmf needs aggregation=uniform: with example weights one user's "
        "contribution is not bounded by C / cohort, so the noise would not cover it",
    ),
    (
        _adaptive_mu_unevaluated,
        "strategy.adaptive_mu.every must be a multiple of eval_every (> 0): mu adapts on the "
        "central val loss of those rounds",
    ),
    (
        lambda c: _present(c, "strategy.adaptive_mu")[0] and _present(c, "eval.overlap")[1] is True,
        "strategy=adafedprox with eval.overlap=true: mu must adapt before the next round "
        "trains; use eval.overlap=false or auto",
    ),
)


def _present(cfg: DictConfig, key: str) -> tuple[bool, Any]:
    node: Any = cfg
    for part in key.split("."):
        if isinstance(node, DictConfig) and part in node:
            node = node[part]
        elif isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False, None
    return True, node


def _bracket(bound: Bound, high: float | None) -> str:
    low = "-inf" if bound.low is None else f"{bound.low:g}"
    top = "inf" if high is None else f"{high:g}"
    return f"{'(' if bound.open_low else '['}{low}, {top}{')' if bound.open_high else ']'}"


def _check_bound(cfg: DictConfig, bound: Bound, limits: dict[str, float]) -> str | None:
    present, value = _present(cfg, bound.key)
    if not present or (value is None and bound.allow_none):
        return None
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if not is_int and not (bound.kind == NUMBER and isinstance(value, float)):
        return f"{bound.key}={value!r}: expected {bound.kind}"
    if not math.isfinite(value):
        return f"{bound.key}={value!r}: must be a finite number"
    high, source = bound.high, ""
    if isinstance(high, str):
        found, limit = _present(cfg, high) if high not in limits else (True, limits[high])
        if not found or not isinstance(limit, int | float):
            high = None  # the limit is not known yet (e.g. train users before data loads)
        else:
            high, source = float(limit), f" ({limit:g}: {high})"
    low_bad = bound.low is not None and (
        value <= bound.low if bound.open_low else value < bound.low
    )
    high_bad = high is not None and (value >= high if bound.open_high else value > high)
    if low_bad or high_bad:
        return f"{bound.key}={value!r}: must be in {_bracket(bound, high)}{source}"
    return None


def _walk(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, DictConfig):
        for key in node:
            if prefix or key != "hydra":
                try:
                    value = node[key]
                except Exception:  # a missing (???) or unresolvable value: its user reports it
                    continue
                yield from _walk(value, f"{prefix}{key!s}.")
    elif isinstance(node, ListConfig):
        for index, item in enumerate(node):
            yield from _walk(item, f"{prefix}{index}.")
    else:
        yield prefix.rstrip("."), node


NAME_LISTS = ("client.faults.kinds.",)  # lists of names: `nan` there is the fault, no number


def _non_finite(cfg: DictConfig) -> list[str]:
    return [
        f"{key}={value!r}: must be a finite number"
        for key, value in _walk(cfg)
        if isinstance(value, float) and not math.isfinite(value) and not key.startswith(NAME_LISTS)
    ]


@cache
def _known_keys(source: str | None, section: str) -> frozenset[str]:
    """Keys of `section` in conf/config.yaml (source None) or in any option of a group."""
    files = [CONF_DIR / "config.yaml"]
    if source is not None:
        files = sorted(CONF_DIR.glob(f"{source}/*.yaml"))
    inner = section if source is None else section.partition(".")[2]
    keys: set[str] = set()
    for path in files:
        node = OmegaConf.load(path)
        found, sub = _present(node, inner) if inner else (True, node)  # type: ignore[arg-type]
        if found and isinstance(sub, DictConfig):
            keys.update(str(k) for k in sub)
    if section == "":  # every directory under conf/ is a config group
        keys.update(p.name for p in CONF_DIR.iterdir() if p.is_dir())
    if section == "simulation.backend.client_resources":
        keys.update(RAY_RESOURCES)
    return frozenset(keys)


def _unknown_keys(cfg: DictConfig) -> list[str]:
    problems = []
    for section, source in SECTIONS.items():
        found, node = _present(cfg, section) if section else (True, cfg)
        if not found or not isinstance(node, DictConfig):
            continue
        known = _known_keys(source, section)
        for key in node:
            if section == "" and str(key) == "hydra":
                continue
            if str(key) not in known:
                name = f"{section}.{key!s}" if section else str(key)
                problems.append(f"{name}: unknown key (known: {', '.join(sorted(known))})")
    return problems


def config_problems(cfg: DictConfig, limits: dict[str, float] | None = None) -> list[str]:
    """Every problem of the config (pure: no torch, no files but conf/)."""
    problems = _non_finite(cfg) + _unknown_keys(cfg)
    reported = {p.partition("=")[0] for p in problems}
    for bound in BOUNDS:
        if bound.key not in reported and (problem := _check_bound(cfg, bound, limits or {})):
            problems.append(problem)
    for key, choices in CHOICES.items():
        present, value = _present(cfg, key)
        if isinstance(value, bool):
            value = str(value).lower()
        if present and value not in choices:
            problems.append(f"{key}={value!r}: expected one of {', '.join(choices)}")
    problems += [message for applies, message in COMBINATIONS if applies(cfg)]
    return problems


def _attached(cfg: DictConfig) -> bool:
    """Whether the run attaches to a Ray cluster (whose GPUs and CPUs are not this
    machine's)."""
    present, address = _present(cfg, "simulation.backend.init_args.address")
    return present and address not in (None, "", "local")


def device_problems(cfg: DictConfig) -> list[str]:
    """GPUs or CPUs the config asks of this machine but it lacks (imports torch)."""
    problems = []
    wants_cuda = cfg.get("device") == "cuda"
    _, gpus = _present(cfg, "simulation.backend.client_resources.num_gpus")
    _, cpus = _present(cfg, "simulation.backend.client_resources.num_cpus")
    client_gpus = _federated(cfg) and not _attached(cfg) and bool(gpus) and gpus > 0
    if wants_cuda or client_gpus:
        import torch  # only now: the pure checks above stay fast

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if wants_cuda and count == 0:
            problems.append("device=cuda: no CUDA GPU on this machine; use device=auto or cpu")
        if client_gpus and gpus > count:
            problems.append(
                f"simulation.backend.client_resources.num_gpus={gpus}: this machine has "
                f"{count} CUDA GPU(s), so no client could start; use simulation=cpu"
            )
    affinity = getattr(os, "sched_getaffinity", None)
    machine_cpus = len(affinity(0)) if affinity else os.cpu_count()
    if _federated(cfg) and not _attached(cfg) and cpus and machine_cpus and cpus > machine_cpus:
        problems.append(
            f"simulation.backend.client_resources.num_cpus={cpus}: this machine has "
            f"{machine_cpus} CPU(s), so no client could start"
        )
    return problems


def check_config(cfg: DictConfig, limits: dict[str, float] | None = None) -> None:
    """Raise one ConfigError listing every problem; the device checks run only once the
    config itself is sound."""
    problems = config_problems(cfg, limits) or device_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems))


def validate_run_config(cfg: DictConfig, num_train_users: int | None = None) -> None:
    """`check_config`, with the train population once it is known (it bounds cohort_size,
    unless users are sampled with replacement)."""
    with_replacement = _target(cfg, "sampler").endswith("WithReplacementSampler")
    limits = None
    if num_train_users is not None and not with_replacement:
        limits = {"train users": float(num_train_users)}
    check_config(cfg, limits)
