"""The CPUs a run's own Ray may use: the job's share of the machine, not the machine.

Ray sizes a cluster it starts from the node's core count (or a container's CPU quota). Inside
a SLURM job, or under `taskset`, the process may run on fewer cores than the node has: SLURM
binds the job to its `--cpus-per-task` cores (cgroup cpuset, visible as the CPU affinity) and
says how many in `SLURM_CPUS_PER_TASK`. A Ray that counted the node's 64 cores would start 64
client actors on a 8-core job. So a run that starts its own Ray gives it
`num_cpus = min(CPU affinity, SLURM_CPUS_PER_TASK)` where that is below the node's count.
GPUs need nothing: SLURM sets CUDA_VISIBLE_DEVICES to the job's GPUs, and Ray counts only
those. A run that attaches to a running cluster (`address` set) uses that cluster's resources.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any


def job_cpus(environ: Mapping[str, str] | None = None) -> int:
    """The CPUs this process may use: its affinity, capped by SLURM_CPUS_PER_TASK if set."""
    environ = os.environ if environ is None else environ
    affinity = getattr(os, "sched_getaffinity", None)
    cpus = len(affinity(0)) if affinity else (os.cpu_count() or 1)
    slurm = environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        cpus = min(cpus, int(slurm))
    return max(cpus, 1)


def sized_init_args(
    init_args: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """`ray.init` arguments with `num_cpus` set to the job's CPUs when this run starts its
    own Ray, the user did not set it, and the job has fewer CPUs than the node."""
    sized = dict(init_args)
    if sized.get("address") or "num_cpus" in sized:
        return sized
    cpus = job_cpus(environ)
    if cpus < (os.cpu_count() or cpus):
        sized["num_cpus"] = cpus
    return sized
