"""The optimised banded factorization: a hand-solved case, its loss and gradient, pfl's result."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from flair_fl.privacy.bmf import BandedMFDP, BandedNoise
from flair_fl.privacy.bmf_factorization import (
    column_norms,
    dense,
    gram_band,
    loss_and_gradient,
    optimize_gram,
    pfl_strategy_from_gram,
    prefix_sum_loss,
    sqrt_band,
    strategy_band,
    strategy_from_gram,
    to_band,
)

# T = 2, 2 bands, by hand: X = [[1, x], [x, 1]], A^T A = [[2, 1], [1, 1]], so the loss
# tr(A^T A X^-1) = (3 - 2x) / (1 - x^2); its derivative vanishes at x^2 - 3x + 1 = 0.
X_2 = (3 - math.sqrt(5)) / 2  # 0.381966
LOSS_2 = (3 - 2 * X_2) / (1 - X_2**2)  # 2.618034 = (3 + sqrt 5) / 2


def _dense_loss_and_gradient(x: np.ndarray) -> tuple[float, np.ndarray]:
    a = np.tril(np.ones(x.shape))
    m = a.T @ a
    inverse = np.linalg.inv(x)
    return float(np.trace(m @ inverse)), -inverse @ m @ inverse


def test_two_rounds_two_bands_is_the_hand_solved_optimum() -> None:
    gram, _ = optimize_gram(2, 2, tolerance=1e-10)  # tighter than pfl's 1e-3, to check x
    c = dense(strategy_from_gram(gram))
    pfl_c = dense(pfl_strategy_from_gram(gram))

    assert gram[1, 0] == pytest.approx(X_2, abs=1e-6)
    assert prefix_sum_loss(strategy_from_gram(gram)) == pytest.approx(LOSS_2, abs=1e-9)
    # C^T C = X with C lower triangular: C = [[sqrt(1 - x^2), 0], [x, 1]], unit columns.
    np.testing.assert_allclose(c, [[math.sqrt(1 - X_2**2), 0], [X_2, 1]], atol=1e-6)
    np.testing.assert_allclose(column_norms(to_band(c, 2)), [1, 1], atol=1e-12)
    # pfl's np.linalg.cholesky(X) = [[1, 0], [x, sqrt(1 - x^2)]]: unit rows, and its first
    # column has norm sqrt(1 + x^2) = 1.0705 > 1, the sensitivity its accounting misses.
    np.testing.assert_allclose(pfl_c, [[1, 0], [X_2, math.sqrt(1 - X_2**2)]], atol=1e-6)
    assert column_norms(to_band(pfl_c, 2))[0] == pytest.approx(math.sqrt(1 + X_2**2), abs=1e-6)


@pytest.mark.parametrize(("rounds", "bands"), [(1, 1), (2, 2), (7, 3), (20, 6)])
def test_structured_loss_and_gradient_equal_the_dense_formulas(rounds: int, bands: int) -> None:
    start = sqrt_band(rounds, bands)
    gram = gram_band(start / column_norms(start))
    gram[1:] *= 0.8  # off the square root, still positive definite

    loss, gradient = loss_and_gradient(gram)

    x = dense(gram)
    x = x + np.tril(x, -1).T
    dense_loss, dense_gradient = _dense_loss_and_gradient(x)
    assert loss == pytest.approx(dense_loss, rel=1e-12)
    np.testing.assert_allclose(gradient, to_band(dense_gradient, bands), atol=1e-9)


def test_a_gram_matrix_outside_the_positive_definite_cone_is_refused() -> None:
    gram = np.array([[1.0, 1.0, 1.0], [1.5, 1.5, 0.0]])  # |X_01| > 1

    with pytest.raises(np.linalg.LinAlgError):
        loss_and_gradient(gram)


def test_optimized_c_is_banded_unit_column_and_beats_the_square_root() -> None:
    rounds, bands = 40, 5

    gram, iterations = optimize_gram(rounds, bands)
    band = strategy_from_gram(gram)

    c = dense(band)
    assert 0 < iterations < 1000
    assert np.allclose(np.triu(c, 1), 0) and np.all(np.diag(c) > 0)
    assert np.all(np.tril(c, -bands) == 0)  # band storage holds bands diagonals only
    np.testing.assert_allclose(column_norms(band), 1.0, atol=1e-12)
    np.testing.assert_allclose(gram_band(band), gram, atol=1e-12)  # C^T C = X
    _, gradient = loss_and_gradient(gram)
    assert np.max(np.abs(gradient[1:])) <= 1e-3  # pfl's stopping rule, stationary
    # The banded square root (truncated) is feasible but not optimal for T = 40.
    assert prefix_sum_loss(band) < prefix_sum_loss(sqrt_band(rounds, bands))


def test_the_optimized_c_is_cached_by_rounds_and_bands(tmp_path: Path) -> None:
    first = strategy_band("optimized", 12, 3, tmp_path)
    (cached,) = tmp_path.iterdir()

    np.save(cached, first * 1.0)  # the cache is what a second call returns
    second = strategy_band("optimized", 12, 3, tmp_path)
    other = strategy_band("optimized", 12, 2, tmp_path)

    assert cached.name.startswith("bmf-optimized-T12-b3-")
    np.testing.assert_array_equal(first, second)
    assert other.shape == (2, 12) and len(list(tmp_path.iterdir())) == 2
    np.save(cached, first * 2.0)  # column norms 2: not a valid C
    with pytest.raises(ValueError, match="delete it"):
        strategy_band("optimized", 12, 3, tmp_path)


def test_dp_bmf_noise_follows_the_optimized_c_and_records_it() -> None:
    dp = BandedMFDP(min_separation=4, noise_multiplier=1.0, secure_noise=False)
    from tests.test_privacy_bmf import _context

    dp.round_stages(_context(2, 80, 10))
    assert dp.noise_state is not None
    draws = np.eye(10)
    outputs = np.stack([dp.noise_state.step(draws[t]) for t in range(10)])

    band = strategy_band("optimized", 10, 3, None)
    np.testing.assert_allclose(outputs, np.linalg.inv(dense(band)), atol=1e-6)  # C^-1 z
    described = dp.describe()
    assert described["factorization"] == "optimized"
    assert described["column_norm_max"] == pytest.approx(1.0, abs=1e-12)
    assert described["prefix_sum_loss"] == pytest.approx(prefix_sum_loss(band))
    with pytest.raises(RuntimeError, match="10 rounds"):
        dp.noise_state.step(draws[0])


# pfl-research 0.6.0 installed without its dependencies (it pins dp-accounting < 0.6; the
# factorizer needs none of what differs) plus the three its imports need. A subprocess,
# because pfl fixes its framework once per process.
PFL_PACKAGES = ("pfl==0.6.0", "multiprocess>=0.70.15,<0.71", "dill", "prv-accountant>=0.2,<0.3")
PFL_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from pfl.internal.ops import pytorch_ops
    from pfl.internal.ops.selector import set_framework_module
    set_framework_module(pytorch_ops)
    from pfl.privacy.ftrl_mechanism import (
        BandedMatrixFactorizationMechanism, FTRLMatrixFactorizer, ForwardSubstitution)
    rounds, min_separation = int(sys.argv[1]), int(sys.argv[2])
    mask = BandedMatrixFactorizationMechanism._get_banded_matrix_mask(rounds, min_separation - 1)
    x = FTRLMatrixFactorizer(np.tril(np.ones((rounds, rounds))), mask).optimize()
    x = np.asarray(x)
    c = np.linalg.cholesky(x)  # what BandedMatrixFactorizationMechanism uses as C
    noise = ForwardSubstitution(c, min_separation - 1)
    draws = np.random.default_rng(0).normal(size=(rounds, 3))
    out = [np.asarray(noise.step(d)).tolist() for d in draws]
    json.dump({"x": x.tolist(), "c": c.tolist(), "noise": out, "draws": draws.tolist()},
              sys.stdout)
    """
)
UNREACHABLE = ("connection", "network is unreachable", "temporary failure", "max retries")


@pytest.mark.slow  # installs pfl-research (seconds) and runs its optimiser (~2 s)
def test_against_pfl_research_factorizer(tmp_path: Path) -> None:
    target = tmp_path / "pfl"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target"]
    pip = subprocess.run(
        [*install, str(target), *PFL_PACKAGES],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if pip.returncode and any(word in pip.stderr.lower() for word in UNREACHABLE):
        pytest.skip(f"package index unreachable: {pip.stderr.strip()[-300:]}")
    assert pip.returncode == 0, pip.stderr
    rounds, min_separation = 64, 9  # pfl's bandwidth min_separation - 1 = 8 bands
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run(
        [sys.executable, "-c", PFL_SCRIPT, str(rounds), str(min_separation)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    pfl = json.loads(run.stdout)
    pfl_x, pfl_c = np.array(pfl["x"]), np.array(pfl["c"])

    gram, _ = optimize_gram(rounds, min_separation - 1)

    # Same problem, same optimum: X within 1e-3 entrywise (both stop at max |gradient|
    # <= 1e-3; measured 3.9e-4), the loss within 1e-7 relative (measured 1e-9).
    x = dense(gram)
    np.testing.assert_allclose(x + np.tril(x, -1).T, pfl_x, atol=1e-3)
    ours = prefix_sum_loss(strategy_from_gram(gram))
    pfl_gram_loss = loss_and_gradient(to_band(pfl_x, min_separation - 1))[0]
    assert ours == pytest.approx(pfl_gram_loss, rel=1e-7)
    assert ours <= pfl_gram_loss * (1 + 1e-9)
    # pfl's C is L = cholesky(X): its loss and column norms are not the optimised ones.
    pfl_band = to_band(pfl_c, min_separation - 1)
    np.testing.assert_allclose(pfl_band, pfl_strategy_from_gram(to_band(pfl_x, 8)), atol=1e-9)
    assert column_norms(pfl_band).max() == pytest.approx(1.885, abs=0.01)
    assert prefix_sum_loss(pfl_band) == pytest.approx(616.9, rel=1e-3)
    assert ours == pytest.approx(439.49, rel=1e-4)
    # The forward substitution is the same: our noise for pfl's C equals pfl's noise.
    noise = BandedNoise(pfl_band)
    draws = np.array(pfl["draws"])
    ours_noise = np.stack([noise.step(d) for d in draws])
    np.testing.assert_allclose(ours_noise, np.array(pfl["noise"]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("factorization", ["sqrt", "optimized"])
@pytest.mark.parametrize(("rounds", "bands"), [(1, 4), (2, 4), (3, 47)])
def test_a_run_shorter_than_the_bands_gets_a_valid_factorization(
    tmp_path: Path, factorization: str, rounds: int, bands: int
) -> None:
    # e.g. debug=tiny (2 rounds) with privacy=dp_bmf: bands below the last row hold nothing
    band = strategy_band(factorization, rounds, bands, tmp_path)
    c = dense(band)
    a = np.tril(np.ones((rounds, rounds)))
    assert prefix_sum_loss(band) == pytest.approx(float(np.sum((a @ np.linalg.inv(c)) ** 2)))
    assert np.all(column_norms(band) <= 1 + 1e-9)  # sensitivity at most one clip norm
