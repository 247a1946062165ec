"""Weights & Biases: one W&B run per Hydra job (`logger=wandb`); wandb is imported only here.

The run gets the resolved config, every numeric per-round metric with the round as the W&B
step (train/val metrics, DP figures `dp_*`/`privacy_*` when present) and the final summary
(test metrics, best val) in `run.summary`. Jobs of one Hydra multirun share a W&B group, so
the dashboard compares them.
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

RUN_ID_FILE = "flair_fl_run_id"  # under <run dir>/wandb/: a resumed run continues this W&B run


def hydra_job_labels() -> tuple[str | None, str | None]:
    """(group, name) of the current Hydra job, or None for what Hydra does not say.

    group: in a multirun, the sweep directory's last two parts (`2025-01-31/12-00-00` for
    the default `outputs/multirun/<date>/<time>`), shared by every job of the sweep;
    name: the job's override dirname (`client.lr=0.05,seed=1`), when it has overrides.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None, None
    hydra_cfg = HydraConfig.get()
    group = None
    if hydra_cfg.mode == RunMode.MULTIRUN:
        group = "/".join(Path(str(hydra_cfg.sweep.dir)).parts[-2:])
    return group, str(hydra_cfg.job.override_dirname) or None


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, int | float]:
    """The numeric entries of a metrics dict (W&B charts numbers; strings are dropped)."""
    return {
        key: value if isinstance(value, int) else float(value)
        for key, value in metrics.items()
        if isinstance(value, numbers.Real) and not isinstance(value, bool)
    }


class WandbLogger:
    """Logs one run to W&B; local files (offline runs too) go under `<run dir>/wandb/`.

    `mode`: online | offline | disabled; None defers to `WANDB_MODE` (else online).
    `group`/`name`: explicit values win over the Hydra multirun group and override dirname.
    The run is finished by `close`, with exit code 0 once a summary was logged and 1 when the
    job failed before its summary. A resumed run dir continues the W&B run it started.
    """

    def __init__(
        self,
        out_dir: str | Path,
        run_config: dict[str, Any] | None = None,
        project: str = "flair-fl",
        entity: str | None = None,
        group: str | None = None,
        name: str | None = None,
        tags: list[str] | None = None,
        notes: str | None = None,
        mode: str | None = None,
    ):
        import wandb

        hydra_group, hydra_name = hydra_job_labels()
        id_path = Path(out_dir) / "wandb" / RUN_ID_FILE
        previous_id = id_path.read_text().strip() if id_path.is_file() else None
        self.run: Any = wandb.init(
            project=project,
            entity=entity,
            group=group or hydra_group,
            name=name or hydra_name,
            tags=[str(tag) for tag in tags] if tags else None,
            notes=notes,
            mode=mode,  # type: ignore[arg-type]
            dir=str(Path(out_dir)),
            config=dict(run_config or {}),
            id=previous_id,
            resume="allow" if previous_id else None,
            reinit="create_new",  # sweep jobs share a process: never reuse a previous run
        )
        if self.run.settings.mode != "disabled":
            id_path.parent.mkdir(parents=True, exist_ok=True)
            id_path.write_text(self.run.id)
        self.summarized = False

    def log_round(self, server_round: int, metrics: dict[str, Any]) -> None:
        self.run.log(numeric_metrics(metrics), step=server_round)

    def log_untrained(self, metrics: dict[str, Any]) -> None:
        """The untrained model's val metrics as step 0, so every chart starts there."""
        self.run.log(numeric_metrics(metrics), step=0)

    def log_summary(self, summary: dict[str, Any]) -> None:
        self.run.summary.update(dict(summary))
        self.summarized = True

    def close(self) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            run.finish(exit_code=0 if self.summarized else 1)
