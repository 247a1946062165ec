"""A small run on a busy machine, before and after the fair-CPU-share settings, paired.

    python scripts/bench_shared.py --before-tree ../flair-fl-before --after-tree . --pairs 1

Each measurement starts `--busy` busy-loop processes (`python -c "while True: pass"`, nice 0,
what another user's job looks like to the scheduler), then runs
`python -m flair_fl.run debug=tiny num_rounds=3 cohort_size=3` beside them and times it.
`before` runs the code in `--before-tree` (a checkout of the version to compare against:
client actors at Ray's nice 15, side processes at nice 0); `after` runs this checkout (actors
at the driver's niceness, side processes at 19). The two alternate (before, after, before,
...), so drift in the machine's other load hits both. While a run goes, the CPU time of every
process below it is sampled from /proc and summed by role (driver, client actors, Ray's GCS
and raylet, Ray's side processes); the niceness each role ran at is recorded.

Writes benchmarks/results/<name>.json and .md (machine, load, command, per-run rows).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RUN_ARGS = ["debug=tiny", "num_rounds=3", "cohort_size=3", "~logger.plots"]
SIDE = (
    "monitor.py",
    "dashboard.py",
    "log_monitor.py",
    "ray::DashboardAgent",
    "ray::RuntimeEnvAgent",
)
ROLES = ("driver", "actors", "gcs+raylet", "side", "other")
TICK = os.sysconf("SC_CLK_TCK")


def _procs() -> dict[int, tuple[int, float, int, str]]:
    """pid -> (parent, CPU s, nice, command line) of every process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            cmd = (entry / "cmdline").read_text().replace("\0", " ").strip()
        except OSError:
            continue
        cpu = (int(fields[11]) + int(fields[12])) / TICK
        found[int(entry.name)] = (int(fields[1]), cpu, int(fields[16]), cmd)
    return found


def _role(pid: int, root: int, cmd: str) -> str:
    if pid == root:
        return "driver"
    if cmd.startswith(("ray::ClientAppActor", "ray::IDLE")):
        return "actors"
    if "gcs_server" in cmd or "raylet/raylet" in cmd:
        return "gcs+raylet"
    if any(name in cmd for name in SIDE):
        return "side"
    return "other"


def _below(root: int, procs: dict[int, tuple[int, float, int, str]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (parent, *_rest) in procs.items():
        children.setdefault(parent, []).append(pid)
    found, todo = [root], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def measure(tree: Path, busy: int, timeout: float) -> dict[str, Any]:
    """One run of RUN_ARGS from `tree` beside `busy` busy loops."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    out = Path(tempfile.mkdtemp(prefix="bench_shared_"))
    env = {**os.environ, "PYTHONPATH": str(tree), "FLWR_TELEMETRY_ENABLED": "0"}
    cmd = [sys.executable, "-m", "flair_fl.run", *RUN_ARGS, f"hydra.run.dir={out}/run"]
    cmd.append(f"data.cache_dir={REPO / '.cache' / 'flair_fl_tests'}")
    cpu: dict[int, tuple[str, float, int]] = {}
    load = os.getloadavg()
    started = time.perf_counter()
    run = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        while run.poll() is None and time.perf_counter() - started < timeout:
            procs = _procs()
            for pid in _below(run.pid, procs):
                if pid in procs:
                    _, seconds, nice, line = procs[pid]
                    cpu[pid] = (_role(pid, run.pid, line), seconds, nice)
            time.sleep(0.5)
        wall = time.perf_counter() - started
        if run.poll() is None:
            run.kill()
        output = run.communicate()[0].decode(errors="replace")
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
    by_role = {role: round(sum(c for r, c, _ in cpu.values() if r == role), 1) for role in ROLES}
    nices = {role: sorted({n for r, _, n in cpu.values() if r == role}) for role in ROLES}
    return {
        "wall_s": round(wall, 1),
        "exit": run.returncode,
        "cpu_s": by_role,
        "nice": nices,
        "load_at_start": [round(x, 2) for x in load],
        "tail": output.splitlines()[-3:] if run.returncode else [],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before-tree", type=Path, required=True)
    parser.add_argument("--after-tree", type=Path, default=REPO)
    parser.add_argument("--pairs", type=int, default=1)
    parser.add_argument("--busy", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1200.0)
    parser.add_argument("--name", default="cpu-shared-machine")
    parser.add_argument("--only", choices=("before", "after"), help="one variant (a rerun)")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for pair in range(args.pairs):
        for label, tree in (("before", args.before_tree), ("after", args.after_tree)):
            if args.only not in (None, label):
                continue
            tree = tree.resolve()
            row = {"pair": pair, "variant": label, **measure(tree, args.busy, args.timeout)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "command": " ".join(["python -m flair_fl.run", *RUN_ARGS]),
        "busy_loops": args.busy,
        "rows": rows,
    }
    out = REPO / "benchmarks" / "results"
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        f"Machine: {results['machine']}, Python {results['python']}; shared with other users' "
        "jobs (load average at each start in the table).",
        "",
        f"Command: `python scripts/bench_shared.py --before-tree <checkout before> --pairs "
        f"{args.pairs}`: `{results['command']}` beside {args.busy} busy loops "
        '(`python -c "while True: pass"`, nice 0), before and after in turn.',
        "",
        "| pair | variant | wall s | exit | driver CPU s | actors CPU s (nice) | GCS+raylet CPU s "
        "| side processes CPU s (nice) | load at start |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c, n = r["cpu_s"], r["nice"]
        lines.append(
            f"| {r['pair']} | {r['variant']} | {r['wall_s']} | {r['exit']} | {c['driver']} | "
            f"{c['actors']} ({n['actors']}) | {c['gcs+raylet']} | {c['side']} ({n['side']}) | "
            f"{' '.join(map(str, r['load_at_start']))} |"
        )
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
