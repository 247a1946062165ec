"""Which of a run directory's saved overrides `resume=` may compose again.

`<run dir>/.hydra/overrides.yaml` is a file on disk, not something the user typed now: whoever
can write the run directory controls it. Composed unchecked, an entry such as
`+model.x._target_=os.system` or `strategy.server.optimizer={_target_: ...}` would be
instantiated by the resumed run. So an entry is accepted only if it

- sets a config group the project defines to options it ships (`model=resnet18`,
  `logger=[csv,wandb]`, `experiment=null`), or
- changes (or deletes, `~`) a key the composed config already has, with a plain value whose
  nested keys the config has too;

and never if it names a Hydra special key (`_target_`, `_args_`, `_partial_`, `_recursive_`,
`_convert_` or any other `_..._`) anywhere in its key or value, uses an interpolation
(`${...}`: resolvers can build config nodes), adds a key (`+`), selects a package (`@`), is a
sweep, or sets where the run connects (`simulation.address`, `simulation.backend.*`: a Ray
cluster is trusted with pickles). Hydra's own settings (`hydra.*`) and `resume` are dropped;
an entry the user gives again on the command line is replaced by it, unchecked (what the user
types now is trusted). Anything else stops the resume, naming the entry.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from flair_fl.errors import ConfigError

SPECIAL_KEY = re.compile(r"^_.*_$")  # Hydra/OmegaConf reserve `_name_` keys
NOT_FROM_RUN_DIR = ("simulation.address", "simulation.backend")
DROPPED = ("hydra", "resume")  # Hydra's own settings; `resume` is given now
_ABSENT = object()

GroupOptions = Callable[[str], list[str]]  # group name -> its options ([] if not a group)
Compose = Callable[[list[str]], DictConfig]  # overrides -> composed config


def _parse(line: str, source: str) -> Override:
    try:
        return OverridesParser.create().parse_overrides([line])[0]
    except HydraException as err:
        raise ConfigError(
            f"{source}: entry {line!r} refused: not a Hydra override ({err})"
        ) from None


def _root(key: str) -> str:
    return re.split(r"[./]", key, maxsplit=1)[0]


def merge_resume_overrides(
    saved: Sequence[str],
    current: Sequence[str],
    source: str,
    group_options: GroupOptions,
    compose: Compose,
) -> list[str]:
    """The overrides to compose for a resume: the checked saved ones, then `current`.

    `source` names the saved file in errors; `compose` builds the config the keys of key
    overrides are looked up in (the accepted group choices and the current overrides).
    """
    current = [
        line for line in current if _root(_parse(line, "command line").key_or_group) != "hydra"
    ]
    given_now = {_parse(line, "command line").key_or_group for line in current}
    kept = [
        (line, override)
        for line in saved
        if (override := _parse(line, source)).key_or_group not in given_now
        and _root(override.key_or_group) not in DROPPED
    ]
    groups: list[tuple[str, Override]] = []
    keys: list[tuple[str, Override]] = []
    for line, override in kept:
        refusal = _general_refusal(override) or _group_refusal(override, group_options)
        if refusal:
            raise _refused(source, line, refusal)
        (groups if group_options(override.key_or_group) else keys).append((line, override))
    config = compose([line for line, _ in groups] + list(current))
    for line, override in keys:
        refusal = _key_refusal(override, config)
        if refusal:
            raise _refused(source, line, refusal)
    return [line for line, _ in kept] + list(current)


def _refused(source: str, line: str, reason: str) -> ConfigError:
    return ConfigError(
        f"{source}: entry {line!r} refused: {reason}. A run directory may only set the config's "
        "own keys and groups; if you wrote this override, give it again on the command line"
    )


def _general_refusal(override: Override) -> str | None:
    key = override.key_or_group
    if override.is_sweep_override():
        return "a sweep, not one value"
    if override.package is not None:
        return "selects a package (@)"
    if any(SPECIAL_KEY.match(part) for part in re.split(r"[./]", key)):
        return "names a Hydra special key (_target_, _partial_, ...)"
    if not override.is_delete() and (problem := _value_problem(override.value())):
        return problem
    if any(key == k or key.startswith(k + ".") for k in NOT_FROM_RUN_DIR):
        return "sets where the run connects (a Ray cluster is trusted with code)"
    return None


def _value_problem(value: Any) -> str | None:
    if isinstance(value, dict):
        for key, item in value.items():
            if SPECIAL_KEY.match(str(key)):
                return f"its value holds the Hydra special key {key!r}"
            if problem := _value_problem(str(key)) or _value_problem(item):
                return problem
    elif isinstance(value, list):
        for item in value:
            if problem := _value_problem(item):
                return problem
    elif isinstance(value, str) and "${" in value:
        return "its value is an interpolation (${...})"
    return None


def _group_refusal(override: Override, group_options: GroupOptions) -> str | None:
    options = group_options(override.key_or_group)
    if not options:
        return None  # not a group: checked as a key
    if override.is_add() or override.is_force_add() or override.is_delete():
        return "adds to or deletes a config group's selection"
    value = override.value()
    chosen = value if isinstance(value, list) else [value]
    for option in chosen:
        if option is not None and (not isinstance(option, str) or option not in options):
            return f"{option!r} is not an option of group {override.key_or_group} ({options})"
    return None


def _key_refusal(override: Override, config: DictConfig) -> str | None:
    key = override.key_or_group
    if override.is_add() or _select(config, key) is _ABSENT:
        return f"the config has no key {key}" + (" (+ adds one)" if override.is_add() else "")
    if override.is_delete():
        return None
    for nested in _nested_keys(override.value(), key):
        if _select(config, nested) is _ABSENT:
            return f"its value sets {nested}, a key the config does not have"
    return None


def _select(config: DictConfig, key: str) -> Any:
    return OmegaConf.select(config, key, default=_ABSENT, throw_on_missing=False)


def _nested_keys(value: Any, prefix: str) -> list[str]:
    if not isinstance(value, dict):
        return []
    out = []
    for key, item in value.items():
        out += [f"{prefix}.{key}", *_nested_keys(item, f"{prefix}.{key}")]
    return out
