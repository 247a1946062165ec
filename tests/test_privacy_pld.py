"""PLD accounting (dp-accounting, pfl-research's settings) and the calibrate command."""

from __future__ import annotations

import subprocess
import sys

import pytest
from dp_accounting.pld import privacy_loss_distribution
from opacus.accountants import RDPAccountant

from flair_fl.privacy import PrivacyContext
from flair_fl.privacy.accounting import RDP_ORDERS, EpsilonCurve, noise_multiplier_for
from flair_fl.privacy.calibrate import main
from flair_fl.privacy.central import CentralDP


def _pfl_pld_epsilon(z: float, q: float, steps: int, delta: float) -> float:
    """pfl-research's PLDPrivacyAccountant.get_composed_accountant, spelled out here."""
    pld = privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=z,
        sensitivity=1,
        pessimistic_estimate=True,
        sampling_prob=q,
        use_connect_dots=True,
        value_discretization_interval=1e-4,
    )
    return float(pld.self_compose(steps).get_epsilon_for_delta(delta))


def test_run_epsilon_with_pld_is_dp_accountings_pld() -> None:
    dp = CentralDP(noise_multiplier=1.2, delta=1e-5, accountant="pld")

    dp.round_stages(PrivacyContext(10, 100, 8, seed=0, weighted_by_key="uniform-weight"))

    expected = _pfl_pld_epsilon(1.2, 0.1, 8, 1e-5)
    assert dp.epsilon_after(8) == pytest.approx(expected, rel=1e-9)
    assert dp.describe()["accountant"] == "pld"
    assert dp.epsilon_after(8) < EpsilonCurve(1.2, 0.1, 1e-5, "rdp")(8)  # tighter than RDP


def test_pld_curve_is_exact_on_its_grid_and_an_upper_bound_between() -> None:
    z, q, delta = 1.0, 0.05, 1e-5
    curve = EpsilonCurve(z, q, delta, "pld", horizon=2000)  # grid: 1..10, every 20th

    between, on_grid = curve(25), _pfl_pld_epsilon(z, q, 40, delta)

    assert between == pytest.approx(on_grid, rel=1e-9)
    assert between >= _pfl_pld_epsilon(z, q, 25, delta)


def test_rdp_orders_are_opacus_defaults() -> None:
    assert list(RDP_ORDERS) == list(RDPAccountant.DEFAULT_ALPHAS)


@pytest.mark.slow
def test_pld_calibration_for_pfl_flair_setting_against_dp_accounting() -> None:
    # pfl-research's FLAIR benchmark: 5,000 of 1e7 users per round, 5,000 rounds,
    # epsilon 2, delta 1e-5 (RDP: z = 0.632). The PLD is built here with dp-accounting's
    # own API, independently of flair_fl.
    q, steps, delta = 5000 / 1e7, 5000, 1e-5

    z = noise_multiplier_for(2.0, delta, q, steps, "pld")

    assert _pfl_pld_epsilon(z, q, steps, delta) <= 2.0
    assert _pfl_pld_epsilon(z - 2e-3, q, steps, delta) > 2.0  # the smallest z, to 1e-3
    assert 0.545 <= z <= 0.548


def test_calibrate_prints_the_runs_noise_multiplier(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--epsilon", "2", "--delta", "1e-5", "--sampling-rate", "0.01", "--steps", "300"]

    status = main(["calibrate", "--accountant", "rdp", *args])

    out = capsys.readouterr().out.splitlines()
    z = noise_multiplier_for(2.0, 1e-5, 0.01, 300, "rdp")
    assert status == 0 and out[0] == f"noise_multiplier={z!r}"
    assert out[1] == f"epsilon={EpsilonCurve(z, 0.01, 1e-5, 'rdp')(300)!r}"


def test_calibrate_epsilon_of_a_noise_multiplier(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(
        [
            *("calibrate", "--noise-multiplier", "1.1", "--delta", "1e-5"),
            *("--sampling-rate", "0.02", "--steps", "50"),
        ]
    )

    reference = RDPAccountant()
    reference.history = [(1.1, 0.02, 50)]
    assert status == 0
    assert capsys.readouterr().out == f"epsilon={reference.get_epsilon(1e-5)!r}\n"


def test_calibrate_pld_starts_without_torch() -> None:
    code = (
        "import sys; from flair_fl.privacy.calibrate import main; "
        "main(['calibrate', '--accountant', 'pld', '--noise-multiplier', '2', '--delta', "
        "'1e-5', '--sampling-rate', '0.1', '--steps', '3']); "
        "assert 'torch' not in sys.modules and 'flwr' not in sys.modules, 'heavy import'"
    )

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)

    assert done.returncode == 0, done.stderr
    epsilon = float(done.stdout.strip().removeprefix("epsilon="))
    assert epsilon == pytest.approx(_pfl_pld_epsilon(2.0, 0.1, 3, 1e-5), rel=1e-9)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--delta", "1.5", "--epsilon", "2"], "--delta"),
        (["--delta", "1e-5"], "--epsilon"),
        (["--delta", "1e-5", "--epsilon", "2", "--accountant", "gdp"], "--accountant"),
        (["--delta", "1e-5", "--epsilon", "2", "--min-separation", "200"], "--min-separation"),
    ],
)
def test_calibrate_bad_input_exits_2_naming_the_option(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["calibrate", "--sampling-rate", "0.01", "--steps", "10", *args])

    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
