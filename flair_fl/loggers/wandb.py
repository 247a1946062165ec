"""Weights & Biases: one W&B run per Hydra job (`logger=wandb`); wandb is imported only here.

Durability: a run killed outright (SIGKILL, OOM, a node lost) keeps every round W&B wrote to
its `.wandb` file. wandb-core buffers that file and writes it every
`x_transaction_log_flush_interval` seconds (15 by default): the logger sets that to
`flush_interval_s` and, at every checkpoint (before the checkpoint is written), waits until
W&B has taken every round logged so far and one flush interval has passed (`flush`), so
the file holds at least every checkpointed round. A resumed run continues from its checkpoint.

The run gets the resolved config, every numeric per-round metric with the round as the W&B
step (train/val metrics, DP figures `dp_*`/`privacy_*` when present) and the final summary
(test metrics, best val) in `run.summary`. Jobs of one Hydra multirun share a W&B group, so
the dashboard compares them.
"""

from __future__ import annotations

import numbers
import time
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
        flush_interval_s: float = 0.25,
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
            settings=wandb.Settings(x_transaction_log_flush_interval=float(flush_interval_s)),
        )
        self.flush_interval_s = float(flush_interval_s)
        if self.run.settings.mode != "disabled":
            id_path.parent.mkdir(parents=True, exist_ok=True)
            id_path.write_text(self.run.id)
        self.summarized = False

    def log_round(self, server_round: int, metrics: dict[str, Any]) -> None:
        # commit: a round is logged once, whole; W&B would otherwise hold the last step back
        # until the next one (a killed run would lose it).
        self.run.log(numeric_metrics(metrics), step=server_round, commit=True)

    def log_untrained(self, metrics: dict[str, Any]) -> None:
        """The untrained model's val metrics as step 0, so every chart starts there."""
        self.run.log(numeric_metrics(metrics), step=0, commit=True)

    def flush(self) -> None:
        """Make every round logged so far durable in the run's `.wandb` file (module doc)."""
        if self.run is None or self.run.settings.mode == "disabled":
            return
        self.run.status()  # a round trip: wandb-core has taken every record sent before it
        time.sleep(2 * self.flush_interval_s)  # its next periodic write has happened

    def log_summary(self, summary: dict[str, Any]) -> None:
        self.run.summary.update(dict(summary))
        self.summarized = True

    def close(self) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            run.finish(exit_code=0 if self.summarized else 1)
