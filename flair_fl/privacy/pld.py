"""Privacy loss distribution (PLD) accounting with Google's dp-accounting (`accountant=pld`).

The settings are pfl-research's `PLDPrivacyAccountant` (its FLAIR benchmark's accountant):
the Poisson-subsampled Gaussian mechanism (add-or-remove-one neighbours, sensitivity 1, so
the standard deviation is the noise multiplier), discretised every 1e-4 with
connect-the-dots and rounded pessimistically, so the epsilon is an upper bound up to
dp-accounting's own truncation (mass below e^-50 dropped).

One epsilon costs ~2-5 s (building the one-step PLD, then composing), whatever the
number of steps.
"""

from __future__ import annotations

import logging
from typing import Any

VALUE_DISCRETIZATION_INTERVAL = 1e-4  # pfl-research's PLDPrivacyAccountant default


def _event(noise_multiplier: float, sample_rate: float, steps: int) -> Any:
    from dp_accounting import dp_event

    step = dp_event.PoissonSampledDpEvent(sample_rate, dp_event.GaussianDpEvent(noise_multiplier))
    return dp_event.SelfComposedDpEvent(step, int(steps))


def _accountant() -> Any:
    """dp-accounting's PLDAccountant: add-or-remove-one, pessimistic, connect-the-dots."""
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    return PLDAccountant(value_discretization_interval=VALUE_DISCRETIZATION_INTERVAL)


def pld_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon at `delta` after `steps` compositions of the subsampled Gaussian."""
    if steps <= 0:
        return 0.0
    accountant = _accountant().compose(_event(noise_multiplier, sample_rate, steps))
    return float(accountant.get_epsilon(delta))


def pld_noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest z (to 1e-3) whose PLD epsilon after `steps` steps is at most `epsilon`.

    dp-accounting's `calibrate_dp_mechanism` (Brent's method, then a check that the z it
    returns does not exceed the budget) with its `PLDAccountant`, which builds pfl-research's
    PLD (`from_gaussian_mechanism`'s defaults are pfl's settings). dp-accounting's RDP z,
    an upper bound on the PLD z, brackets the search (~9 PLD evaluations, ~30-80 s under
    load at pfl-research's FLAIR setting). A run's epsilons (`pld_epsilon`) come from the
    same accountant, so the z found spends at most `epsilon` there too.
    """
    from dp_accounting import mechanism_calibration
    from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

    def event(z: float) -> Any:
        return _event(z, sample_rate, steps)

    absl = logging.getLogger("absl")  # RDP's far-off trial orders log convergence warnings
    level = absl.level
    try:
        absl.setLevel(logging.ERROR)
        upper = float(
            mechanism_calibration.calibrate_dp_mechanism(
                RdpAccountant, event, epsilon, delta, tol=1e-3
            )
        )
        absl.setLevel(level)
        try:
            bracket = mechanism_calibration.ExplicitBracketInterval(upper / 2, upper + 1e-3)
            z = mechanism_calibration.calibrate_dp_mechanism(
                _accountant, event, epsilon, delta, bracket, tol=1e-3
            )
        except ValueError:  # PLD z below upper / 2 (never seen): search from 0
            z = mechanism_calibration.calibrate_dp_mechanism(
                _accountant, event, epsilon, delta, tol=1e-3
            )
    except mechanism_calibration.NoBracketIntervalFoundError:
        raise ValueError("The privacy budget is too low.") from None
    finally:
        absl.setLevel(level)
    return float(z)
