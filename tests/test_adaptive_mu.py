"""AdaFedProx's mu updates against pfl-research's rule, written out here as pfl has it
(pfl/algorithm/fedprox.py, AdaptMuOnMetricCallback.after_central_iteration)."""

from __future__ import annotations

import math
import sys

import pytest

from flair_fl.algorithms.fedprox import AdaFedProx, AdaptiveMu


def pfl_mu_sequence(
    losses: list[float], initial: float, step: float, decrease_after: int
) -> list[float]:
    """pfl's callback, one call per adaptation (its `central_iteration % adapt_frequency
    == 0` calls), returning mu after each."""
    mu, loss_decrease, prev_loss, out = initial, 0, sys.float_info.max, []
    for new_loss in losses:
        if new_loss < prev_loss:
            loss_decrease += 1
            if loss_decrease >= decrease_after:
                mu = max(0.0, mu - step)
        else:
            loss_decrease = 0
            mu = min(1.0, mu + step)
        prev_loss = new_loss
        out.append(mu)
    return out


# Improvements, a plateau (equal is not lower), rises that push mu to its cap, a long streak
LOSSES = [0.9, 0.8, 0.8, 0.85, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8]
LOSSES += [0.7 - 0.04 * i for i in range(14)]


@pytest.mark.parametrize("initial", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("decrease_after", [1, 2, 3])
def test_mu_follows_pfl_research_rule(initial: float, decrease_after: int) -> None:
    # Prepare: adaptation every 20 rounds; evaluations at every 10th round in between
    strategy = AdaFedProx(proximal_mu=initial)
    adaptive = AdaptiveMu(strategy, every=20, step=0.1, decrease_after=decrease_after)

    # Execute
    seen = []
    for i, loss in enumerate(LOSSES):
        adaptive.observe(20 * i, {"val_loss": loss})
        seen.append(strategy.proximal_mu)
        adaptive.observe(20 * i + 10, {"val_loss": -1.0})  # not an adaptation round: ignored
        assert strategy.proximal_mu == seen[-1]

    # Assert
    expected = pfl_mu_sequence(LOSSES, initial, 0.1, decrease_after)
    assert seen == pytest.approx(expected, abs=1e-12)
    assert max(seen) == pytest.approx(1.0) and min(seen) == 0.0  # both clamps were hit


def test_state_round_trips_and_continues_identically() -> None:
    # Prepare: two adapters, one stopped half-way and restored into a fresh one
    whole = AdaptiveMu(AdaFedProx(proximal_mu=0.3), every=1, decrease_after=2)
    first = AdaptiveMu(AdaFedProx(proximal_mu=0.3), every=1, decrease_after=2)
    for r, loss in enumerate(LOSSES[:7]):
        whole.observe(r, {"val_loss": loss})
        first.observe(r, {"val_loss": loss})

    # Execute
    second = AdaptiveMu(AdaFedProx(proximal_mu=0.0), every=1, decrease_after=2)
    second.load_state_dict(first.state_dict())
    for r, loss in enumerate(LOSSES[7:], start=7):
        whole.observe(r, {"val_loss": loss})
        second.observe(r, {"val_loss": loss})

    # Assert
    assert second.state_dict() == whole.state_dict()


def test_first_comparison_is_an_improvement() -> None:
    adaptive = AdaptiveMu(AdaFedProx(proximal_mu=1.0), every=5)

    adaptive.observe(0, {"val_loss": 123.0})

    assert adaptive.mu == pytest.approx(0.9) and adaptive.previous == 123.0
    assert AdaptiveMu(AdaFedProx(proximal_mu=0.0)).previous == math.inf


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"every": 0}, "adaptive_mu.every=0"), ({"metric": "val_macro_ap"}, "lower is better")],
)
def test_bad_settings_are_refused(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        AdaptiveMu(AdaFedProx(proximal_mu=0.0), **kwargs)
