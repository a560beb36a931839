"""Structure stages of a reaction: optimised minima, the transition state and the IRC.

Each stage caches its result in the reaction's directory (``reactant_opt.npz``, ``ts.npz``,
``irc.npz``) or records a failure (``*.failed.json``) and returns None; nothing here raises for a
chemistry failure (:func:`~phljax.datagen.reactions.checks.chemistry_errors`), so one bad reaction
does not stop a run. Any other exception is a bug or a resource failure, not a property of the
reaction: it propagates and nothing is recorded, so the next run tries the stage again.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import numpy as np
from ase import Atoms
from ase.mep import NEB
from ase.optimize import FIRE

from phljax.datagen.cache import load_npz, save_npz
from phljax.datagen.dft import LevelOfTheory, PySCFCalculator, optimize_geometry
from phljax.datagen.reactions.checks import TSVerificationError, chemistry_errors, match_endpoint, verify_ts
from phljax.datagen.reactions.labelling import (
    ReactionDir,
    data_extra,
    hessian_record,
    label_point,
    stationary_hessian,
)
from phljax.datagen.reactions.spec import ReactionConfig
from phljax.optional import import_sella
from phljax.units import DFT_BOHR, DFT_HARTREE, DFT_HARTREE_KCAL_MOL

log = logging.getLogger("phljax.datagen")


def _x64():
    """Context in which Sella's JAX code runs (it needs float64)."""
    return jax.enable_x64(True)


def _atoms(numbers: np.ndarray, positions: np.ndarray):
    return Atoms(numbers=np.asarray(numbers), positions=np.asarray(positions, dtype=np.float64))


def optimize_stage(cfg: ReactionConfig, st: ReactionDir, role: str) -> dict | None:
    """geomeTRIC minimum of the reactant or product -> ``<role>_opt.npz`` (None if it failed)."""
    out = st.path(f"{role}_opt.npz")
    start = getattr(st.rxn, role)
    if os.path.exists(out):
        cached = load_npz(out)
        if not np.allclose(cached["start_positions"], start, atol=1e-6):
            raise ValueError(
                f"{st.rxn.path}: the {role} is not the one {out} was optimised from; the reaction file changed "
                f"after its cache was made. Move {st.dir} away to recompute this reaction."
            )
        return cached
    if st.failed(f"{role}_opt"):
        return None
    log.info("optimise %s %s (%d atoms)", st.rxn.id, role, len(start))
    try:
        res = optimize_geometry(st.rxn.numbers, start, cfg.level)
    except chemistry_errors() as err:  # SCF failure, or geomeTRIC giving up: a recorded failure, not a crash
        st.fail(f"{role}_opt", f"{type(err).__name__}: {err}", error=type(err).__name__)
        return None
    save_npz(out, numbers=st.rxn.numbers, start_positions=start, **res)
    log.info("optimised %s %s: E = %.8f Eh, %d steps, %.0f s",
             st.rxn.id, role, res["energy"], res["n_steps"], res["wall"])  # fmt: skip
    return load_npz(out)


def ts_stage(cfg: ReactionConfig, st: ReactionDir) -> dict | None:
    """NEB guess -> Sella saddle -> analytic Hessian -> one imaginary frequency, or a failure."""
    done = st.path("ts.npz")
    if os.path.exists(done):
        return load_npz(done)
    if st.failed("ts"):
        return None
    r, p = load_npz(st.path("reactant_opt.npz")), load_npz(st.path("product_opt.npz"))
    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    try:
        guess = st.rxn.ts_guess if st.rxn.ts_guess is not None else _neb_guess(cfg, st, r["positions"], p["positions"])
        info["guess"] = "file" if st.rxn.ts_guess is not None else "neb"
        pos, sella = _sella_saddle(cfg, st, guess)
        info.update(sella)
    except chemistry_errors() as err:  # SCF failure or a Sella/NEB breakdown: recorded, the run goes on
        st.fail("ts", f"{type(err).__name__}: {err}", error=type(err).__name__, **info)
        return None
    if not info["converged"]:
        st.fail("ts", f"Sella did not converge to fmax {cfg.ts_fmax} eV/A in {cfg.ts_steps} steps", **info)
        return None
    # The TS Hessian is a helper file until the TS is verified; only then does it become data.
    hess = label_point(cfg, st, "hess_ts", pos, data_extra(st.rxn.id, "rtp", "ts", 0), force_hessian=True)
    if hess is None:
        st.fail("ts", "the TS geometry could not be labelled (see the rejected file)", **info)
        return None
    try:
        check = verify_ts(st.rxn.numbers, pos, hess["hessian"], cfg.imag_tol_cm)
    except TSVerificationError as err:
        st.fail("ts", err, positions=pos, **info)
        return None
    save_npz(done, positions=pos, wall=time.perf_counter() - t0, guess=info["guess"],
             sella_steps=info["steps"], n_gradients=info["n_gradients"], freq_cm=check["freq_cm"],
             imaginary_cm=check["imaginary_cm"], energy=float(hess["energy"]))  # fmt: skip
    barrier = (float(hess["energy"]) - float(r["energy"])) * DFT_HARTREE_KCAL_MOL
    log.info("TS %s: %.0f i cm^-1, barrier %.1f kcal/mol, %d Sella steps, %.0f s",
             st.rxn.id, -check["imaginary_cm"], barrier, info["steps"], time.perf_counter() - t0)  # fmt: skip
    return load_npz(done)


def guess_level(cfg: ReactionConfig) -> LevelOfTheory:
    """The cheap level of the NEB and the guess saddle search."""
    return LevelOfTheory(xc=cfg.guess_xc, basis=cfg.guess_basis, grid_level=3, conv_tol=1e-9, dispersion=False)


def _neb_guess(cfg: ReactionConfig, st: ReactionDir, reactant: np.ndarray, product: np.ndarray) -> np.ndarray:
    """TS guess: the climbing image of an NEB at the guess level, refined to a guess-level saddle."""

    out = st.path("neb.npz")
    if os.path.exists(out):
        return load_npz(out)["guess"]
    level = guess_level(cfg)
    images = [_atoms(st.rxn.numbers, reactant)]
    images += [images[0].copy() for _ in range(cfg.neb_images - 2)]
    images += [_atoms(st.rxn.numbers, product)]
    neb = NEB(images, climb=True, method="improvedtangent")
    neb.interpolate(method="idpp")
    for im in images:
        im.calc = PySCFCalculator(level)
    t0 = time.perf_counter()
    opt = FIRE(neb, logfile=st.path("neb.log"))
    converged = opt.run(fmax=cfg.neb_fmax, steps=cfg.neb_steps)
    energies = np.array([im.get_potential_energy() for im in images])  # eV
    k = int(np.argmax(energies[1:-1])) + 1
    climbing = images[k].positions.copy()
    try:
        guess, info = _sella_saddle(cfg, st, climbing, level, "sella_guess.log")
    except chemistry_errors() as err:  # a failed refinement still leaves the climbing image as a guess
        log.warning("%s: guess-level saddle search failed (%s); using the climbing image", st.rxn.id, err)
        guess, info = climbing, {"converged": False, "steps": -1}
    save_npz(out, images=np.stack([im.positions for im in images]), energies_eV=energies, climbing=climbing,
             guess=guess, highest=k, converged=bool(converged), steps=opt.nsteps, guess_converged=info["converged"],
             guess_steps=info["steps"], wall=time.perf_counter() - t0)  # fmt: skip
    log.info("NEB %s: climbing image %d, %.2f eV above reactant, %d NEB + %d Sella steps at %s/%s, %.0f s",
             st.rxn.id, k, energies[k] - energies[0], opt.nsteps, info["steps"], cfg.guess_xc, cfg.guess_basis,
             time.perf_counter() - t0)  # fmt: skip
    return guess


def _sella_saddle(
    cfg: ReactionConfig,
    st: ReactionDir,
    guess: np.ndarray,
    level: LevelOfTheory | None = None,
    log_name: str = "sella.log",
) -> tuple[np.ndarray, dict]:
    """First-order saddle search with Sella from ``guess`` (exact initial Hessian) at ``level``."""
    sella = import_sella()
    atoms = _atoms(st.rxn.numbers, guess)
    calc = PySCFCalculator(level or cfg.level)
    atoms.calc = calc
    with _x64():
        opt = sella.Sella(atoms, order=1, internal=True, hessian_function=calc.hessian, logfile=st.path(log_name))
        converged = bool(opt.run(fmax=cfg.ts_fmax, steps=cfg.ts_steps))
    info = {"converged": converged, "steps": int(opt.nsteps), "n_gradients": calc.n_gradients,
            "n_hessians": calc.n_hessians}  # fmt: skip
    return atoms.positions.copy(), info


class _BranchAtMinimum(Exception):
    """An IRC branch reached its minimum: max force below ``irc_fmax`` (ends the branch)."""


def irc_stage(cfg: ReactionConfig, st: ReactionDir) -> dict | None:
    """Sella IRC both ways from the TS, ends relaxed and matched to reactant and product."""
    done = st.path("irc.npz")
    if os.path.exists(done):
        return load_npz(done)
    if st.failed("irc"):
        return None
    sella = import_sella()
    ts = load_npz(st.path("ts.npz"))
    t0 = time.perf_counter()
    paths: dict[str, list] = {"forward": [], "reverse": []}
    energies: dict[str, list] = {"forward": [], "reverse": []}
    calc = PySCFCalculator(cfg.level)
    ts_hessian = hessian_record(st, "ts", cfg)["hessian"]  # [N, 3, N, 3] Hartree/Bohr^2

    def hessian(a):  # the TS Hessian is known; anything else is computed
        if np.allclose(a.positions, ts["positions"], atol=1e-8):
            n = len(a)
            return ts_hessian.reshape(3 * n, 3 * n) * DFT_HARTREE / DFT_BOHR**2  # as PySCFCalculator.hessian
        return calc.hessian(a)

    atoms = _atoms(st.rxn.numbers, ts["positions"])
    atoms.calc = calc
    current = {"dir": "forward"}

    def record():
        branch = paths[current["dir"]]
        branch.append(atoms.positions.copy())
        energies[current["dir"]].append(atoms.get_potential_energy())
        # Sella's own test also wants a positive lowest eigenvalue of its updated Hessian, which
        # still carries the TS's negative one at the minimum, so a branch would otherwise idle
        # there until irc_steps. Point 0 is the TS itself (small forces too): need two steps.
        if len(branch) >= 3 and np.linalg.norm(atoms.get_forces(), axis=1).max() < cfg.irc_fmax:
            raise _BranchAtMinimum

    from sella.optimize.irc import IRCInnerLoopConvergenceFailure  # noqa: PLC0415 (optional: the `data` extra)

    stopped = {}
    try:
        with _x64():
            irc = sella.IRC(atoms, dx=cfg.irc_dx, hessian_function=hessian, logfile=st.path("irc.log"))
            irc.attach(record)
            for direction in ("forward", "reverse"):
                current["dir"] = direction
                try:
                    irc.run(fmax=cfg.irc_fmax, steps=cfg.irc_steps, direction=direction)
                except _BranchAtMinimum:
                    pass
                except IRCInnerLoopConvergenceFailure:
                    # The branch ends at its last good point; relaxing that end decides whether it connects.
                    stopped[direction] = len(paths[direction])
                    log.warning("IRC %s %s: inner loop did not converge after %d points; branch ends there",
                                st.rxn.id, direction, len(paths[direction]))  # fmt: skip
    except chemistry_errors() as err:  # SCF failure or an IRC breakdown: recorded, the run goes on
        st.fail("irc", f"{type(err).__name__}: {err}", error=type(err).__name__)
        return None
    if min(len(v) for v in paths.values()) < 2:
        st.fail("irc", f"an IRC branch has fewer than 2 points ({ {k: len(v) for k, v in paths.items()} })")
        return None
    paths = {k: np.stack(v) for k, v in paths.items()}
    energies = {k: np.array(v) for k, v in energies.items()}
    r, p = load_npz(st.path("reactant_opt.npz")), load_npz(st.path("product_opt.npz"))
    ends = {}
    for direction in ("forward", "reverse"):
        try:
            relaxed = optimize_geometry(st.rxn.numbers, paths[direction][-1], cfg.level)["positions"]
        except chemistry_errors() as err:
            st.fail("irc", f"relaxing the {direction} end: {type(err).__name__}: {err}", error=type(err).__name__)
            return None
        ends[direction] = match_endpoint(st.rxn.numbers, relaxed, r["positions"], p["positions"], cfg.endpoint_rmsd)
    connects = sorted(e for e in ends.values() if e) == ["product", "reactant"]
    if not connects:
        st.fail("irc", f"IRC ends relax to {ends}, not to reactant and product", ends=ends)
        return None
    # Only a TS whose IRC joins reactant and product becomes data (RTP), with its NMS samples.
    if cfg.labels == "hessian":
        if not os.path.exists(st.path("rtp_ts.npz")):  # moved already by a run killed before irc.npz
            os.replace(st.path("hess_ts.npz"), st.path("rtp_ts.npz"))
    else:
        stationary_hessian(cfg, st, "ts", ts["positions"])
    save_npz(done, forward=paths["forward"], reverse=paths["reverse"], energies_forward_eV=energies["forward"],
             energies_reverse_eV=energies["reverse"], end_forward=ends["forward"], end_reverse=ends["reverse"],
             stopped_forward=stopped.get("forward", -1), stopped_reverse=stopped.get("reverse", -1),
             wall=time.perf_counter() - t0, n_gradients=calc.n_gradients)  # fmt: skip
    log.info("IRC %s: %d + %d points, forward -> %s, reverse -> %s, %.0f s", st.rxn.id, len(paths["forward"]),
             len(paths["reverse"]), ends["forward"], ends["reverse"], time.perf_counter() - t0)  # fmt: skip
    return load_npz(done)


def irc_points(path: np.ndarray, n: int) -> np.ndarray:  # [M, N, 3] -> [<=n] indices
    """Indices of ``n`` points evenly spaced in arc length along an IRC branch (TS excluded)."""
    if len(path) < 2:
        return np.zeros(0, dtype=int)
    seg = np.linalg.norm((path[1:] - path[:-1]).reshape(len(path) - 1, -1), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    targets = s[-1] * np.arange(1, n + 1) / n
    idx = np.unique(np.searchsorted(s, targets - 1e-12).clip(1, len(path) - 1))
    return idx
