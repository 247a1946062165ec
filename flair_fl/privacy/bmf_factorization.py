"""Strategy matrices C for banded matrix factorization, in lower band storage.

A banded lower-triangular T x T matrix with b bands is held as `band` of shape (b, T):
band[k, j] = C[j + k, j] (column j's k-th entry below the diagonal; band[k, T-k:] is
padding, zero). Two factorizations:

- `sqrt`: the banded square root (Kalinin & Lampert 2024), Toeplitz with coefficients
  binom(2k, k) / 4^k, divided by a full column's norm (closed form).
- `optimized`: what pfl-research's `banded_matrix_factorization` optimises (Choquette-Choo
  et al. 2023, eq. 6): the Gram matrix X = C^T C minimising the prefix-sum error
  tr(A X^-1 A^T) = ||A C^-1||_F^2 (A: lower-triangular ones) subject to diag(X) = 1 (unit
  column norms: sensitivity 1 per participation) and X_ij = 0 for |i - j| >= b. The problem
  is convex; it is solved by L-BFGS over the band of X, exploiting the band: each loss and
  gradient costs a banded Cholesky, one banded solve with T right-hand sides and the band of
  a T x T product, O(T^2 b) (seconds for T = 5,000, b = 47), instead of pfl's dense T x T
  Cholesky solves. C is then the lower-triangular factor with C^T C = X (a Cholesky of the
  reversed X), which keeps X's column norms 1. (pfl takes np.linalg.cholesky(X) = L with
  L L^T = X instead: L's rows, not its columns, have norm 1; see README.)

The optimised C depends only on (T, b) and the tolerance; `strategy_band` caches it as .npy
under a cache directory.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.sparse

log = logging.getLogger(__name__)

FACTORIZATIONS = ("optimized", "sqrt")
GRADIENT_TOLERANCE = 1e-3  # pfl-research's stopping rule: max |dloss/dX_ij| over the band
MAX_ITERATIONS = 1000  # pfl-research's iteration cap
# Also stop once 10 iterations improved the loss by less than this (relative): for large T
# pfl's absolute gradient rule asks for more than the loss can show (~1e-16 relative).
RELATIVE_TOLERANCE = 1e-12
_CACHE_VERSION = 1  # bump when the optimiser's result changes


def bsr_coefficients(bands: int) -> np.ndarray:
    """c_0..c_{bands-1} of the banded square root, scaled so that a full column has norm 1."""
    c = np.ones(bands)
    for k in range(1, bands):
        c[k] = c[k - 1] * (2 * k - 1) / (2 * k)  # binom(2k, k) / 4^k, recursively
    return c / np.linalg.norm(c)


def sqrt_band(rounds: int, bands: int) -> np.ndarray:
    """The banded square root in band storage (last columns have norm < 1: truncated)."""
    band = np.repeat(bsr_coefficients(bands)[:, None], rounds, axis=1)
    return _zero_padding(band)


def dense(band: np.ndarray) -> np.ndarray:
    """The T x T lower-triangular matrix held in `band` (for inspection and tests)."""
    bands, rounds = band.shape
    matrix = np.zeros((rounds, rounds))
    for k in range(min(bands, rounds)):
        matrix += np.diag(band[k, : rounds - k], -k)
    return matrix


def to_band(matrix: np.ndarray, bands: int) -> np.ndarray:
    """The lower `bands` diagonals of a square matrix in band storage."""
    rounds = matrix.shape[0]
    band = np.zeros((bands, rounds))
    for k in range(min(bands, rounds)):
        band[k, : rounds - k] = np.diagonal(matrix, -k)
    return band


def gram_band(band: np.ndarray) -> np.ndarray:
    """C^T C (symmetric, as banded as C) in lower band storage."""
    bands, rounds = band.shape
    gram = np.zeros_like(band)
    # (C^T C)[j + k, j] = sum_m C[j + m, j + k] C[j + m, j], m = k .. bands - 1
    for k in range(bands):
        for m in range(k, min(bands, rounds)):  # a band below the last row holds nothing
            width = rounds - m
            gram[k, :width] += band[m - k, k : k + width] * band[m, :width]
    return gram


def column_norms(band: np.ndarray) -> np.ndarray:
    """L2 norm of each column of C: a participation in round j moves C x by this x clip."""
    return np.sqrt(np.sum(band**2, axis=0))


def prefix_sum_loss(band: np.ndarray) -> float:
    """||A C^-1||_F^2: total variance of the noise on the T prefix sums, in units of sigma^2."""
    return _loss(gram_band(band[: band.shape[1]]))  # bands below the last row hold nothing


def strategy_from_gram(gram: np.ndarray) -> np.ndarray:
    """Lower-triangular banded C with C^T C = X (X in lower band storage, positive definite).

    With J the reversal, J X J = L L^T (Cholesky) gives C = J L^T J; in band storage
    reversing each diagonal maps one to the other.
    """
    return _reverse_diagonals(scipy.linalg.cholesky_banded(_reverse_diagonals(gram), lower=True))


def pfl_strategy_from_gram(gram: np.ndarray) -> np.ndarray:
    """pfl-research 0.6's C for the Gram matrix X: the Cholesky factor L (L L^T = X)."""
    return scipy.linalg.cholesky_banded(gram, lower=True)


def optimize_gram(
    rounds: int,
    bands: int,
    tolerance: float = GRADIENT_TOLERANCE,
    max_iterations: int = MAX_ITERATIONS,
) -> tuple[np.ndarray, int]:
    """(X, iterations): the banded unit-diagonal X minimising tr(A X^-1 A^T), by L-BFGS.

    Starts from the banded square root with its columns rescaled to norm 1 (a near-optimal
    feasible point, so far fewer iterations than pfl's start at X = I; the optimum is the
    same: the loss is strictly convex in X). Stops when every entry of the gradient in the
    band is at most `tolerance` in absolute value, as pfl does.
    """
    if bands < 1 or rounds < 1:
        raise ValueError(f"rounds={rounds}, bands={bands}: both must be >= 1")
    bands = min(bands, rounds)
    start = sqrt_band(rounds, bands)
    gram = gram_band(start / column_norms(start))
    if bands == 1:
        return gram, 0  # X = I is the only feasible point
    free = _zero_padding(np.ones_like(gram)).astype(bool)
    free[0] = False  # the diagonal stays 1
    loss, gradient = loss_and_gradient(gram)
    history: list[tuple[np.ndarray, np.ndarray]] = []  # (step, gradient change), newest last
    losses = [loss]
    for iteration in range(max_iterations):
        if np.max(np.abs(gradient[free])) <= tolerance:
            return gram, iteration
        if len(losses) > 10 and losses[-11] - loss <= RELATIVE_TOLERANCE * loss:
            return gram, iteration  # converged to what float64 resolves (large T)
        direction = _lbfgs_direction(gradient, _preconditioner(gradient) * free, history)
        slope = float(np.sum(gradient[free] * direction[free]))
        if slope >= 0:  # not a descent direction (curvature lost): restart from -gradient
            history.clear()
            direction = -_preconditioner(gradient) * free * gradient
            slope = float(np.sum(gradient[free] * direction[free]))
        step = 1.0 if history else min(1.0, 0.1 / np.max(np.abs(direction)))
        for _ in range(30):  # backtracking (Armijo); a step that leaves the PD cone fails
            candidate = gram + step * direction
            try:
                new_loss, new_gradient = loss_and_gradient(candidate)
            except np.linalg.LinAlgError:
                step *= 0.25
                continue
            if new_loss <= loss + 1e-4 * step * slope:
                break
            step *= 0.25
        else:
            log.info("banded MF: line search made no progress at iteration %d", iteration)
            return gram, iteration
        pair = ((candidate - gram) * free, (new_gradient - gradient) * free)
        if float(np.sum(pair[0] * pair[1])) > 0:  # keep only pairs with positive curvature
            history.append(pair)
            del history[:-10]  # memory 10
        gram, loss, gradient = candidate, new_loss, new_gradient
        losses.append(loss)
    log.warning(
        "banded MF: stopped after %d iterations with max |gradient| %.3g > %.3g",
        max_iterations,
        np.max(np.abs(gradient[free])),
        tolerance,
    )
    return gram, max_iterations


def strategy_band(
    factorization: str, rounds: int, bands: int, cache_dir: str | os.PathLike[str] | None
) -> np.ndarray:
    """C for `rounds` rounds and `bands` bands; `optimized` is read from / written to the cache.

    Bands below the last row hold nothing, so a run shorter than `bands` rounds optimises
    over `rounds` bands (the same set of matrices)."""
    if factorization == "sqrt":
        return sqrt_band(rounds, bands)
    if factorization != "optimized":
        raise ValueError(f"factorization={factorization!r}: one of {', '.join(FACTORIZATIONS)}")
    bands = min(bands, rounds)
    path = None
    if cache_dir is not None:
        name = f"bmf-optimized-T{rounds}-b{bands}-tol{GRADIENT_TOLERANCE:g}-v{_CACHE_VERSION}.npy"
        path = Path(cache_dir).expanduser().resolve() / name
        cached = _load_checked(path, rounds, min(bands, rounds))
        if cached is not None:
            return cached
    started = time.perf_counter()
    log.info("banded MF: optimising C for %d rounds, %d bands (cached afterwards)", rounds, bands)
    gram, iterations = optimize_gram(rounds, bands)
    band = strategy_from_gram(gram)
    log.info(
        "banded MF: %d iterations in %.1f s, prefix-sum loss %.6g",
        iterations,
        time.perf_counter() - started,
        prefix_sum_loss(band),
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        with partial.open("wb") as f:
            np.save(f, band, allow_pickle=False)
        partial.replace(path)  # atomic: concurrent runs never read half a file
    return band


def _load_checked(path: Path, rounds: int, bands: int) -> np.ndarray | None:
    """The cached C, or None when absent; a file that is not a valid C raises."""
    if not path.exists():
        return None
    band = np.load(path, allow_pickle=False)
    valid = (
        band.shape == (bands, rounds)
        and np.all(np.isfinite(band))
        and np.all(band[0] > 0)
        and np.allclose(column_norms(band), 1.0, atol=1e-9)
    )
    if not valid:
        raise ValueError(f"{path}: not a banded C for {rounds} rounds, {bands} bands; delete it")
    return np.asarray(band, dtype=np.float64)


def _zero_padding(band: np.ndarray) -> np.ndarray:
    for k in range(1, band.shape[0]):
        band[k, band.shape[1] - k :] = 0.0
    return band


def _reverse_diagonals(band: np.ndarray) -> np.ndarray:
    out = np.zeros_like(band)
    rounds = band.shape[1]
    for k in range(band.shape[0]):
        out[k, : rounds - k] = band[k, : rounds - k][::-1]
    return out


def _symmetric_sparse(gram: np.ndarray) -> scipy.sparse.csr_matrix:
    bands, rounds = gram.shape
    diagonals = [gram[k, : rounds - k] for k in range(bands)]
    offsets = list(range(bands))
    return scipy.sparse.diags(
        [*diagonals[:0:-1], *diagonals], [-k for k in offsets[:0:-1]] + offsets, format="csr"
    )


def loss_and_gradient(gram: np.ndarray) -> tuple[float, np.ndarray]:
    """tr(A X^-1 A^T) and, in band storage, its gradient -G = -(X^-1 A^T A X^-1) on the band.

    The gradient is the derivative with respect to X_ij for each of the two symmetric
    entries (pfl's convention). Structure makes it O(T b^2) instead of O(T^3): with
    A^-1 = I - S (S the shift down), G^-1 = Q = X (I - S)(I - S)^T X is banded (half
    bandwidth w = 2b - 1), so G's band is the band of the inverse of a banded matrix,
    which its Cholesky factor gives by the backward recursion Z L = L^-T (selected
    inversion, Takahashi et al. 1973), one w x w product per column. The loss is
    tr(M X^-1) = tr(X G), a sum over the band. Raises LinAlgError unless X is positive
    definite.
    """
    bands, rounds = gram.shape
    scipy.linalg.cholesky_banded(gram, lower=True)  # raises unless X is positive definite
    x = _symmetric_sparse(gram)
    diagonal = np.full(rounds, 2.0)
    diagonal[0] = 1.0
    off = -np.ones(rounds - 1)
    m_inverse = scipy.sparse.diags([off, diagonal, off], [-1, 0, 1], format="csr")
    q = x @ m_inverse @ x
    width = min(2 * bands - 1, rounds - 1)
    q_band = np.zeros((width + 1, rounds))
    for k in range(width + 1):
        q_band[k, : rounds - k] = q.diagonal(-k)
    factor = scipy.linalg.cholesky_banded(q_band, lower=True)
    z = np.zeros_like(q_band)  # band of Z = Q^-1, filled from the last column back
    window = np.zeros((width, width))  # Z[j+1 .. j+w, j+1 .. j+w] (zero past the end)
    column = np.zeros(width)
    for j in range(rounds - 1, -1, -1):
        below = min(width, rounds - 1 - j)
        column[:below] = factor[1 : below + 1, j]
        column[below:] = 0.0
        pivot = factor[0, j]
        # Z[j+1 .., j] = -Z[j+1 .., j+1 ..] L[j+1 .., j] / L_jj, then Z_jj from it
        z_column = -(window @ column) / pivot
        z_jj = 1.0 / pivot**2 - float(column @ z_column) / pivot
        z[0, j] = z_jj
        z[1 : below + 1, j] = z_column[:below]
        if width:  # slide the window one column left and up
            window[1:, 1:] = window[:-1, :-1]
            window[0, 0] = z_jj
            window[1:, 0] = window[0, 1:] = z_column[:-1]
    g = z[:bands]
    loss = float(np.sum(gram[0] * g[0]) + 2.0 * np.sum(gram[1:] * g[1:]))
    return loss, -g


def _loss(gram: np.ndarray) -> float:
    return loss_and_gradient(gram)[0]


def _preconditioner(gradient: np.ndarray) -> np.ndarray:
    """1 / (G_ii + G_jj) for the band entry (i, j): the Hessian's diagonal when X ~ I.

    The loss weighs early rounds far more than late ones (A^T A has entries T - max(i, j)),
    so the Hessian's scale varies by orders of magnitude along the band; without this
    L-BFGS needs iterations roughly proportional to T.
    """
    g = -gradient[0]
    rounds = g.shape[0]
    pre = np.zeros_like(gradient)
    for k in range(gradient.shape[0]):
        pre[k, : rounds - k] = 1.0 / (g[k:] + g[: rounds - k])
    return pre


def _lbfgs_direction(
    gradient: np.ndarray, pre: np.ndarray, history: list[tuple[np.ndarray, np.ndarray]]
) -> np.ndarray:
    """-H_k g by the two-loop recursion over the kept (step, gradient change) pairs.

    `pre` is the diagonal initial inverse Hessian (zero off the free entries).
    """
    q = gradient * (pre != 0)
    alphas = []
    for s, y in reversed(history):
        rho = 1.0 / float(np.sum(y * s))
        alpha = rho * float(np.sum(s * q))
        q = q - alpha * y
        alphas.append((rho, alpha))
    q = q * pre
    if history:
        s, y = history[-1]
        q = q * (float(np.sum(s * y)) / float(np.sum(y * pre * y)))
    for (s, y), (rho, alpha) in zip(history, reversed(alphas), strict=True):
        beta = rho * float(np.sum(y * q))
        q = q + (alpha - beta) * s
    return -q
