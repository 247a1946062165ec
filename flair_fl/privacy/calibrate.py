"""Budget planning without training: the noise multiplier for a target, or the epsilon of one.

    python -m flair_fl.privacy calibrate --accountant pld --epsilon 2 --delta 1e-5 \\
        --sampling-rate 0.0005 --steps 5000
    noise_multiplier=0.546...

The figures are those a run prints: the same `noise_multiplier_for` and `EpsilonCurve`
that `privacy=dp` calls (a run's sampling rate is noise_cohort_size / population_size and
its steps are num_rounds). With `--min-separation b` they are banded matrix
factorization's (`privacy=dp_bmf`): at most ceil(steps / b) participations per user, each
sampled at rate b * sampling-rate (see bmf_accounting.py).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from flair_fl.privacy.accounting import ACCOUNTANTS, EpsilonCurve, noise_multiplier_for


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = getattr(kind, "__name__", "number")
    return parse


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _delta(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flair_fl.privacy",
        description="Differential-privacy budget planning (trains nothing).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    cal = commands.add_parser(
        "calibrate",
        help="noise multiplier for (epsilon, delta), or the epsilon of --noise-multiplier",
        description="Prints noise_multiplier=<z> for a target epsilon; with "
        "--noise-multiplier, prints epsilon=<e> for that z instead.",
    )
    cal.add_argument("--accountant", choices=ACCOUNTANTS, default="rdp")
    cal.add_argument("--epsilon", type=_positive(float), help="target epsilon")
    cal.add_argument("--delta", type=_delta, required=True)
    cal.add_argument(
        "--sampling-rate",
        type=_rate,
        required=True,
        help="q = users per round / population (a run: noise_cohort_size / population_size)",
    )
    cal.add_argument("--steps", type=_positive(int), required=True, help="rounds (num_rounds)")
    cal.add_argument("--noise-multiplier", type=_positive(float), help="z: print its epsilon")
    cal.add_argument(
        "--epsilon-tolerance",
        type=_positive(float),
        default=0.01,
        help="rdp/prv: Opacus's search stops within this below epsilon (default 0.01)",
    )
    cal.add_argument(
        "--min-separation",
        type=_positive(int),
        default=1,
        help="banded matrix factorization (privacy=dp_bmf): rounds between a user's "
        "participations (default 1: plain DP-FedAvg)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, compute, print; exit status 2 on bad input (argparse's convention).

    rdp / prv import Opacus (and with it torch, seconds); pld needs only dp-accounting.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.noise_multiplier is None and args.epsilon is None:
        parser.error("calibrate: give --epsilon (to get z) or --noise-multiplier (to get epsilon)")
    from flair_fl.privacy.bmf_accounting import participation

    try:
        rate, compositions = participation(args.sampling_rate, args.steps, args.min_separation)
    except ValueError as err:
        parser.error(f"--min-separation={args.min_separation}: {err}")
    z = args.noise_multiplier
    if z is None:
        try:
            z = noise_multiplier_for(
                args.epsilon,
                args.delta,
                rate,
                compositions,
                args.accountant,
                args.epsilon_tolerance,
            )
        except ValueError as err:
            print(f"calibrate: --epsilon={args.epsilon}: {err}", file=sys.stderr)
            return 2
        print(f"noise_multiplier={z!r}")
    curve = EpsilonCurve(z, rate, args.delta, args.accountant, args.steps, args.min_separation)
    print(f"epsilon={curve(args.steps)!r}")
    return 0
