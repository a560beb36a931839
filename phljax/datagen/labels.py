"""Label one geometry into the cache: analytic Hessian labels or Hessian-free (FD HVP) labels.

A labelled geometry is one ``<stem>.npz`` in atomic units (Hartree, Bohr; positions Angstrom);
a geometry whose SCF or Hessian check fails is ``<stem>.rejected.json`` instead (the reason and
the geometry), never data. Both count as done, so a resumed run does not retry them, except
a Hessian-check rejection that looser limits would pass (:func:`passes_now`).
:func:`to_molecules` converts cached records to phljax's eV/Angstrom ``Molecule``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import numpy as np

from phljax import units
from phljax.data import Molecule
from phljax.datagen.cache import load_json, save_json, save_npz
from phljax.datagen.dft import (
    FD_STEP,
    HESSIAN_LIMITS,
    HessianCheckError,
    LevelOfTheory,
    SCFNotConvergedError,
    fd_hvp,
    fd_hvp_error,
    hessian_checks,
    label_geometry,
    validate_hessian,
)

log = logging.getLogger("phljax.datagen")

__all__ = [
    "PROBE_KINDS",
    "is_done",
    "label_hessian",
    "label_hvp",
    "make_probes",
    "passes_now",
    "rejection",
    "to_molecules",
]

#: The probe distributions :func:`make_probes` draws (named as in :data:`phljax.probes.DISTRIBUTIONS`).
PROBE_KINDS = ("gaussian", "onehot", "orthogonal", "rademacher")


def is_done(stem: str) -> bool:
    """Whether ``stem`` was labelled or rejected already."""
    return os.path.exists(stem + ".npz") or os.path.exists(stem + ".rejected.json")


def rejection(stem: str) -> dict | None:
    """The rejection record of ``stem``, or None: none was written, or a label stands beside it
    (labelled since, e.g. on another machine and merged by copying files)."""
    path = stem + ".rejected.json"
    if not os.path.exists(path) or os.path.exists(stem + ".npz"):
        return None
    return load_json(path)


def passes_now(stem: str, max_asym_rel: float, max_sum_rule_rel: float) -> bool:
    """Whether ``stem`` was rejected by the Hessian checks only, with errors within these limits
    (so, under looser limits than it was rejected by, it is labelled again: the rejection
    record keeps the checks, not the label)."""
    record = rejection(stem)
    checks = record and record.get("checks")  # present when the Hessian was computed and failed a check
    return bool(checks) and checks["asym_rel"] <= max_asym_rel and checks["sum_rule_rel"] <= max_sum_rule_rel


def _where(stem: str) -> str:
    """'<directory>/<stem>' of a cache path, for log lines and rejection records."""
    return os.path.join(os.path.basename(os.path.dirname(stem)), os.path.basename(stem))


def _reject(stem: str, where: str, err: Exception, positions: np.ndarray, **info) -> bool:
    log.warning("REJECT %s: %s", where, err)
    save_json(stem + ".rejected.json", {"where": where, "reason": str(err), "positions": np.asarray(positions), **info})
    return False


def label_hessian(
    stem: str,
    numbers: np.ndarray,  # [N]
    positions: np.ndarray,  # [N, 3] Angstrom
    level: LevelOfTheory,
    extra: dict[str, Any],
    max_asym_rel: float = HESSIAN_LIMITS.max_asym_rel,
    max_sum_rule_rel: float = HESSIAN_LIMITS.max_sum_rule_rel,
) -> bool:
    """Energy, gradient and checked analytic Hessian of one geometry -> ``<stem>.npz``.

    Args:
        stem: cache path without extension.
        numbers: atomic numbers [N]; positions: [N, 3] Angstrom.
        level: level of theory.
        extra: provenance stored alongside (category, reaction, point, ...), numpy-storable.
        max_asym_rel, max_sum_rule_rel: Hessian check thresholds (relative to max |H|).

    Returns:
        True if written, False if rejected (``<stem>.rejected.json`` holds why).
    """
    where = _where(stem)
    t0 = time.perf_counter()
    try:
        out = label_geometry(numbers, positions, level)
        checks = validate_hessian(out["hessian"], max_asym_rel, max_sum_rule_rel)
    except (SCFNotConvergedError, HessianCheckError) as err:
        info = {"checks": hessian_checks(out["hessian"])} if "out" in locals() else {}
        return _reject(stem, where, err, positions, **info)
    checks_dft = hessian_checks(out["hessian_dft"])
    save_npz(
        stem + ".npz",
        **{k: out[k] for k in out},
        wall_total=time.perf_counter() - t0,
        asym_rel=checks["asym_rel"],
        sum_rule_rel=checks["sum_rule_rel"],
        sum_rule_abs=checks["sum_rule_abs"],
        sum_rule_rel_dft=checks_dft["sum_rule_rel"],
        labels="hessian",
        level=json.dumps(level.describe()),
        **extra,
    )
    if os.path.exists(stem + ".rejected.json"):  # rejected under tighter limits before
        os.remove(stem + ".rejected.json")
    log.info(
        "labelled %s: E = %.8f Eh, |g|max = %.2e Eh/a0, sum rule %.1e rel, asym %.1e rel, scf %d cyc, %.1f+%.1f+%.1f s",
        where, out["energy"], np.abs(out["gradient"]).max(), checks["sum_rule_rel"], checks["asym_rel"],
        out["scf_cycles"], out["wall_scf"], out["wall_grad"], out["wall_hess"],
    )  # fmt: skip
    return True


def make_probes(kind: str, num_probes: int, n_atoms: int, rng: np.random.Generator) -> np.ndarray:  # [K, N, 3]
    """Probe vectors with E[v v^T] = I: ``gaussian`` N(0, I), ``rademacher`` +-1, ``onehot`` sqrt(3N) e_c, c uniform, or
    ``orthogonal``: sqrt(3N) times the columns of random orthogonal blocks of 3N (the last block
    partial), as :func:`phljax.probes.molecule_probes` draws them.

    Returns:
        [num_probes, n_atoms, 3] float64, dimensionless.

    Raises:
        ValueError: for an unknown kind or num_probes < 1.
    """
    d = 3 * n_atoms
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    if kind == "gaussian":
        return rng.standard_normal((num_probes, n_atoms, 3))
    if kind == "rademacher":
        return rng.choice(np.array([-1.0, 1.0]), size=(num_probes, n_atoms, 3))
    if kind == "onehot":
        v = np.zeros((num_probes, d))
        v[np.arange(num_probes), rng.integers(0, d, num_probes)] = np.sqrt(d)
        return v.reshape(num_probes, n_atoms, 3)
    if kind == "orthogonal":
        blocks = []
        for start in range(0, num_probes, d):
            q, r = np.linalg.qr(rng.standard_normal((d, min(d, num_probes - start))))
            blocks.append((q * np.where(np.diag(r) < 0, -1.0, 1.0)).T)  # sign fix: Haar distributed
        return (np.sqrt(d) * np.concatenate(blocks)).reshape(num_probes, n_atoms, 3)
    raise ValueError(f"unknown probe kind {kind!r}: expected one of {PROBE_KINDS}")


def label_hvp(
    stem: str,
    numbers: np.ndarray,  # [N]
    positions: np.ndarray,  # [N, 3] Angstrom
    probes: np.ndarray,  # [K, N, 3]
    level: LevelOfTheory,
    extra: dict[str, Any],
    step: float = FD_STEP,  # Angstrom
    reference_hessian: np.ndarray | None = None,  # [N, 3, N, 3] Hartree/Bohr^2
) -> bool:
    """Hessian-free labels: energy, gradient and finite-difference HVPs -> ``<stem>.npz``.

    Args:
        stem: cache path without extension.
        numbers, positions: the geometry ([N], [N, 3] Angstrom).
        probes: [K, N, 3] probe vectors (see :func:`make_probes`).
        level: level of theory.
        extra: provenance stored alongside.
        step: finite-difference displacement, Angstrom (see :func:`phljax.datagen.dft.fd_hvp`).
        reference_hessian: an analytic Hessian at the same geometry, if one exists; the relative
            error max|H v - FD| / max|H v| is then stored as ``fd_rel_error`` (validation).

    Returns:
        True if written, False if rejected.
    """
    where = _where(stem)
    t0 = time.perf_counter()
    try:
        out = fd_hvp(numbers, positions, probes, level, step)
    except SCFNotConvergedError as err:
        return _reject(stem, where, err, positions)
    fd_err = {}
    if reference_hessian is not None:
        fd_err["fd_rel_error"] = fd_hvp_error(reference_hessian, probes, out["hvps"])
    save_npz(
        stem + ".npz",
        numbers=np.asarray(numbers),
        positions=np.asarray(positions),
        energy=out["energy"],
        gradient=out["gradient"],
        hvp_probes=probes,
        hvps=out["hvps"],
        hvps_disp=out["hvps_disp"],
        fd_step=step,
        wall_scf=out["wall_scf"],
        wall_fd=out["wall_fd"],
        n_gradients=out["n_gradients"],
        wall_total=time.perf_counter() - t0,
        labels="hvp",
        level=json.dumps(level.describe()),
        **fd_err,
        **extra,
    )
    log.info(
        "labelled %s (HVP, K=%d, h=%.0e A): E = %.8f Eh, %d gradients, %.1f s%s",
        where, len(probes), step, out["energy"], out["n_gradients"], time.perf_counter() - t0,
        f", FD error {fd_err['fd_rel_error']:.1e} rel" if fd_err else "",
    )  # fmt: skip
    return True


_SCALE_META_KEYS = ("family", "smiles", "split", "size_bin")  # phljax.datagen.scale's
_META_KEYS = ("category", "reaction", "point", "toward", "name", "kind", "index", "source", *_SCALE_META_KEYS)


def to_molecules(records: list[dict[str, Any]], symmetrize: bool = True) -> list:
    """Convert cached records (Hartree, Bohr) to ``phljax.data.Molecule`` (eV, Angstrom).

    Args:
        records: loaded ``<stem>.npz`` dicts (Hessian or HVP labels).
        symmetrize: store (H + H^T)/2 (the raw analytic Hessian is symmetric to ~1e-7 rel).

    Returns:
        ``Molecule`` records: energy eV, forces eV/Angstrom, Hessian [N, 3, N, 3] or HVPs
        [K, N, 3] eV/Angstrom^2, with the provenance keys of the record in ``meta``.
    """
    ha, bohr = units.HARTREE, units.BOHR  # the reader side's constants, as phljax.data.read_h5
    mols = []
    for r in records:
        n = len(r["numbers"])
        labels: dict[str, Any] = {}
        if "hessian" in r:
            h = np.asarray(r["hessian"], dtype=np.float64)
            if symmetrize:
                flat = h.reshape(3 * n, 3 * n)
                h = (0.5 * (flat + flat.T)).reshape(n, 3, n, 3)
            labels["hessian"] = h * ha / bohr**2
        if "hvps" in r:
            labels["hvp_probes"] = np.asarray(r["hvp_probes"], dtype=np.float64)
            labels["hvps"] = np.asarray(r["hvps"], dtype=np.float64) * ha / bohr**2
        meta = {k: r[k].item() for k in _META_KEYS if k in r}
        meta = {k: (str(v) if isinstance(v, (str, bytes, np.str_)) else v) for k, v in meta.items()}
        if "sum_rule_rel" in r:
            meta["sum_rule_rel"] = float(r["sum_rule_rel"])
        mols.append(
            Molecule(
                numbers=np.asarray(r["numbers"], dtype=np.int32),
                positions=np.asarray(r["positions"], dtype=np.float64),
                energy=float(r["energy"]) * ha,
                forces=-np.asarray(r["gradient"]) * ha / bohr,
                meta=meta,
                **labels,
            )
        )
    return mols
