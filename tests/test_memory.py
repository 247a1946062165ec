"""Peak memory as the benchmark and the per-round metrics report it (real processes)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_python(body: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(body)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.splitlines()[-1]))


def test_a_child_of_a_large_process_reports_its_own_peak() -> None:
    # Execute: a parent holding 600 MiB starts a small child (fork+exec, as Ray and
    # subprocess do); the child reports both measures
    result = run_python(
        """
        import json, subprocess, sys
        import numpy as np
        held = np.ones(600 * 2**20 // 8)  # 600 MiB, touched
        child = subprocess.run([sys.executable, "-c", (
            "import json, resource; from flair_fl.services.memory import peak_rss_mb; "
            "print(json.dumps({'peak': peak_rss_mb(), "
            "'ru_maxrss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))"
        )], capture_output=True, text=True, check=True)
        print(child.stdout.strip())
        """
    )

    # Assert: ru_maxrss carries the parent's 600 MiB over; the child's own peak does not
    assert result["ru_maxrss"] > 600
    assert result["peak"] < 300


def test_reset_starts_the_peak_over() -> None:
    result = run_python(
        """
        import json
        import numpy as np
        from flair_fl.services.memory import peak_rss_mb, reset_peak_rss
        block = np.ones(400 * 2**20 // 8)
        del block
        before = peak_rss_mb()
        reset_peak_rss()
        print(json.dumps({"before": before, "after": peak_rss_mb()}))
        """
    )
    assert result["before"] > 400
    assert result["after"] < result["before"] - 300
