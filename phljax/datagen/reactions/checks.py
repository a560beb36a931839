"""Geometry checks of the pipeline: is a saddle a transition state, which minimum is an IRC end?"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from phljax.datagen.dft import HessianCheckError, SCFNotConvergedError
from phljax.datagen.sampling import BOND_SCALE, bonded_pairs, normal_modes
from phljax.optional import import_sella

#: Frequencies below minus this count as imaginary, cm^-1 (smaller negative ones are numerical
#: noise of the projection of translations and rotations).
IMAG_TOL_CM = 20.0
#: When reactant and product have the same bond graph (conformers), an IRC end is the one it lies
#: within this aligned RMSD of (and nearer to), Angstrom.
ENDPOINT_RMSD = 0.3


class TSVerificationError(ValueError):
    """A saddle-point search ended at a geometry that is not a first-order saddle."""


class NotAMinimumError(ValueError):
    """An optimised reactant or product has an imaginary frequency (it is a saddle point)."""


@functools.cache
def chemistry_errors() -> tuple[type[Exception], ...]:
    """The exceptions that are a failure of the chemistry: the only ones a stage records.

    A stage that raises one of these is recorded as failed (``<stage>.failed.json``) and never
    retried. Any other exception (a ``TypeError`` from a code change, a ``MemoryError``) is a
    failure of the program: it propagates, nothing is recorded, and the next run tries again.

    - :class:`~phljax.datagen.dft.SCFNotConvergedError`: an SCF did not converge, or a geometry
      optimisation stopped far from a minimum (PySCF itself raises nothing for either: it returns
      ``converged=False``, which :mod:`phljax.datagen.dft` turns into this error);
    - :class:`~phljax.datagen.dft.HessianCheckError`, :class:`TSVerificationError`,
      :class:`NotAMinimumError`: the ``ValueError`` subclasses of the pipeline's own checks;
    - ``geometric.errors.Error``: every error geomeTRIC defines (not converged, a bad structure,
      an engine error, ...);
    - Sella's ``IRCInnerLoopConvergenceFailure`` and ``NoValidInternalError`` (no valid internal
      coordinates for a geometry).

    Sella and geomeTRIC are imported on the first call (the ``data`` extra; one not installed
    cannot have raised anything), so this is a function, not a constant; the tuple is built once.
    """
    errors: list[type[Exception]] = [SCFNotConvergedError, HessianCheckError, TSVerificationError, NotAMinimumError]
    try:
        import geometric.errors  # noqa: PLC0415 (optional: the `data` extra)

        errors.append(geometric.errors.Error)
    except ImportError:
        pass
    try:
        import_sella()
        from sella.internal import NoValidInternalError  # noqa: PLC0415 (optional: the `data` extra)
        from sella.optimize.irc import IRCInnerLoopConvergenceFailure  # noqa: PLC0415 (optional: the `data` extra)

        errors += [IRCInnerLoopConvergenceFailure, NoValidInternalError]
    except ImportError:
        pass
    return tuple(errors)


def bond_graph(numbers: np.ndarray, positions: np.ndarray, scale: float = BOND_SCALE) -> frozenset:
    """Bonded pairs {(i, j)}: distance below ``scale`` times the sum of covalent radii."""
    i, j = bonded_pairs(numbers, positions, scale)
    return frozenset(zip(i.tolist(), j.tolist(), strict=True))


def aligned_rmsd(a: np.ndarray, b: np.ndarray) -> float:
    """RMSD (Angstrom) between two [N, 3] structures with the same atom order after the best
    rigid superposition (Kabsch; reflections excluded)."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    u, _, vt = np.linalg.svd(a.T @ b)
    d = np.sign(np.linalg.det(u @ vt))
    rot = u @ np.diag([1.0, 1.0, d]) @ vt
    return float(np.sqrt(((a @ rot - b) ** 2).sum(-1).mean()))


def count_imaginary(freq_cm: np.ndarray, tol_cm: float = IMAG_TOL_CM) -> int:
    """Number of vibrational frequencies below ``-tol_cm`` (imaginary ones are negative), cm^-1."""
    return int(np.sum(np.asarray(freq_cm) < -tol_cm))


def verify_minimum(
    numbers: np.ndarray,  # [N]
    positions: np.ndarray,  # [N, 3] Angstrom
    hessian: np.ndarray,  # [N, 3, N, 3] Hartree/Bohr^2
    tol_cm: float = IMAG_TOL_CM,
) -> dict[str, Any]:
    """Check a minimum: no imaginary frequency after projecting out translations and rotations.

    A geometry optimiser started in a symmetric structure keeps its symmetry and can stop on a
    saddle point of higher symmetry (a planar or twisted structure); only the Hessian tells.

    Returns:
        ``{"freq_cm": [M] cm^-1, "lowest_cm": the lowest frequency}``.

    Raises:
        NotAMinimumError: with the imaginary frequencies, if there is any.
    """
    freq = normal_modes(numbers, positions, hessian)["freq_cm"]
    n_imag = count_imaginary(freq, tol_cm)
    if n_imag:
        raise NotAMinimumError(
            f"not a minimum: {n_imag} imaginary frequencies (below -{tol_cm:g} cm^-1): "
            f"{np.round(np.sort(freq)[:n_imag], 1).tolist()} cm^-1"
        )
    return {"freq_cm": freq, "lowest_cm": float(freq.min())}


def verify_ts(
    numbers: np.ndarray,  # [N]
    positions: np.ndarray,  # [N, 3] Angstrom
    hessian: np.ndarray,  # [N, 3, N, 3] Hartree/Bohr^2
    tol_cm: float = IMAG_TOL_CM,
) -> dict[str, Any]:
    """Check a transition state: exactly one imaginary frequency after projecting out
    translations and rotations.

    Returns:
        ``{"freq_cm": [M] cm^-1, "n_imaginary": 1, "imaginary_cm": the imaginary frequency
        (negative)}``.

    Raises:
        TSVerificationError: with the count and the frequencies, if not exactly one is imaginary.
    """
    freq = normal_modes(numbers, positions, hessian)["freq_cm"]
    n_imag = count_imaginary(freq, tol_cm)
    if n_imag != 1:
        raise TSVerificationError(
            f"{n_imag} imaginary frequencies (below -{tol_cm:g} cm^-1), expected exactly 1; "
            f"lowest: {np.round(np.sort(freq)[:3], 1).tolist()} cm^-1"
        )
    return {"freq_cm": freq, "n_imaginary": n_imag, "imaginary_cm": float(freq.min())}


def match_endpoint(
    numbers: np.ndarray,
    end: np.ndarray,
    reactant: np.ndarray,
    product: np.ndarray,
    rmsd_tol: float = ENDPOINT_RMSD,
) -> str | None:
    """Which minimum a relaxed IRC end is: ``"reactant"``, ``"product"`` or None (neither).

    Bond graphs decide when reactant and product differ in bonding; otherwise (conformers) the
    aligned RMSD does: within ``rmsd_tol`` Angstrom of one and nearer to it than to the other.
    """
    g_end = bond_graph(numbers, end)
    g_r, g_p = bond_graph(numbers, reactant), bond_graph(numbers, product)
    if g_r != g_p:
        return "reactant" if g_end == g_r else "product" if g_end == g_p else None
    if g_end != g_r:
        return None
    d_r, d_p = aligned_rmsd(end, reactant), aligned_rmsd(end, product)
    best, d = ("reactant", d_r) if d_r < d_p else ("product", d_p)
    return best if d <= rmsd_tol else None
