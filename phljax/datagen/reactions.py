"""Reaction data pipeline: reactants, products, transition states, IRC paths and normal-mode samples.

For each reaction, given as atom-mapped reactant and product structures (a multi-frame xyz file:
frame 0 the reactant, frame 1 the product, an optional frame 2 a transition-state guess), the
pipeline

1. optimises reactant and product with geomeTRIC on PySCF gradients;
2. labels both with the analytic Hessian (they are RTP data, and their normal modes are needed);
3. finds the transition state: a climbing-image NEB (ASE, IDPP interpolation) at a cheaper
   integration grid gives the guess, Sella refines it as a first-order saddle starting from the
   analytic Hessian; the TS is labelled and accepted only with exactly one imaginary frequency
   after translations and rotations are projected out;
4. follows the intrinsic reaction coordinate from the TS in both directions (Sella's IRC, mass
   weighted), relaxes both ends with geomeTRIC and checks they are the reactant and the product;
   points spread evenly along the path are kept and labelled;
5. draws normal-mode samples (harmonic Boltzmann, ANI-style) around reactant, product and TS (the
   TS's imaginary mode is not displaced) and labels them.

Labels are either analytic Hessians (``labels="hessian"``) or, the case PHL is made for, K probe
vectors per geometry with their Hessian-vector products by central differences of analytic
gradients (``labels="hvp"``). Stationary points always get an analytic Hessian too (needed for
TS verification and normal modes), which in HVP mode validates the finite-difference step.

Every finished calculation is written to ``<cache>/<reaction>/`` at once (atomically), so an
interrupted run resumes where it stopped and never recomputes; failures (SCF non-convergence,
failed TS search, wrong number of imaginary frequencies, IRC not connecting) are written as
``*.failed.json`` / ``*.rejected.json``, logged and summarised, never written as data. Given the
seed, everything is deterministic. :func:`assemble` writes the paper's layout: three ANI-HDF5
files (RTP, IRC, NMS) with each geometry's category, reaction id and point.

Units: positions Angstrom; cache energies Hartree, gradients Hartree/Bohr, Hessians
Hartree/Bohr^2; ASE-side (NEB, Sella) eV and Angstrom.

References:
    G. Henkelman, B. P. Uberuaga, H. Jonsson, J. Chem. Phys. 113, 9901 (2000) (climbing-image NEB).
    S. Smidstrup et al., J. Chem. Phys. 140, 214106 (2014) (IDPP interpolation).
    E. D. Hermes, K. Sargsyan, H. N. Najm, J. Zador, J. Chem. Theory Comput. 18, 6974 (2022) (Sella).
    K. Fukui, Acc. Chem. Res. 14, 363 (1981) (IRC).
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import time
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from phljax.datagen.cache import load_json, load_npz, save_json, save_npz
from phljax.datagen.dft import HARTREE_EV, LevelOfTheory, PySCFCalculator, optimize_geometry
from phljax.datagen.dispersion import BOHR_ANGSTROM
from phljax.datagen.labels import is_done, label_hessian, label_hvp, make_probes, to_molecules
from phljax.datagen.sampling import normal_modes, sample_normal_modes

log = logging.getLogger("phljax.datagen")

CATEGORIES = ("rtp", "irc", "nms")
#: cache file names of labelled data geometries, per category (helper Hessians are hess_*.npz)
_PATTERNS = {"rtp": "rtp_*.npz", "irc": "irc_*_[0-9][0-9].npz", "nms": "nms_*_[0-9][0-9][0-9].npz"}
STATIONARY = ("reactant", "product", "ts")
SOURCE = "phljax.datagen.reactions (PySCF omegaB97X-D/6-31G(d) + CHG dispersion)"


class TSVerificationError(ValueError):
    """A saddle-point search ended at a geometry that is not a first-order saddle."""


class ReactionFileError(ValueError):
    """A reaction file is malformed (names the file and frame)."""


# ----------------------------------------------------------------------------- reactions


@dataclasses.dataclass(frozen=True)
class Reaction:
    """One atom-mapped reaction.

    Attributes:
        id: name (the xyz file's stem unless the file says ``reaction=...``).
        numbers: atomic numbers [N], the same order in every frame.
        reactant, product: start structures [N, 3] Angstrom.
        ts_guess: optional transition-state guess [N, 3] Angstrom (skips the NEB).
        comment: free text (what the reaction is).
        path: the file it came from.
    """

    id: str
    numbers: np.ndarray
    reactant: np.ndarray
    product: np.ndarray
    ts_guess: np.ndarray | None = None
    comment: str = ""
    path: str = ""


def read_reaction(path: str) -> Reaction:
    """Read a reaction from a multi-frame (extended) xyz file.

    Frame 0 is the reactant, frame 1 the product and an optional frame 2 a TS guess, all with the
    same atoms in the same order. Only neutral closed-shell reactions are supported: a comment
    line may say ``charge=0 spin=0``; anything else is refused.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ReactionFileError: naming the file and frame, for a wrong frame count, different atoms
            between frames, overlapping atoms, or a charge/spin other than 0.
    """
    from ase.io import read

    if not os.path.exists(path):
        raise FileNotFoundError(f"no such reaction file: {path}")
    try:
        frames = read(path, index=":")
    except Exception as err:  # ase raises many types for a malformed file
        raise ReactionFileError(f"{path}: cannot read as xyz: {err}") from err
    if len(frames) not in (2, 3):
        raise ReactionFileError(f"{path}: expected 2 frames (reactant, product) or 3 (+ TS guess), got {len(frames)}")
    numbers = frames[0].numbers
    for i, f in enumerate(frames):
        if not np.array_equal(f.numbers, numbers):
            raise ReactionFileError(
                f"{path}: frame {i} has atoms {f.get_chemical_formula()} in a different order or composition "
                f"than frame 0 ({frames[0].get_chemical_formula()}); atoms must be mapped"
            )
        for key in ("charge", "spin"):
            if int(f.info.get(key, 0)) != 0:
                raise ReactionFileError(f"{path}: frame {i}: {key}={f.info[key]}; only neutral closed-shell reactions")
        d = np.linalg.norm(f.positions[:, None] - f.positions[None], axis=-1) + 10 * np.eye(len(f))
        if d.min() < 0.5:
            i_, j_ = np.unravel_index(np.argmin(d), d.shape)
            raise ReactionFileError(f"{path}: frame {i}: atoms {i_} and {j_} are {d.min():.2f} A apart")
    if (sum(numbers) % 2) != 0:
        raise ReactionFileError(f"{path}: odd number of electrons ({sum(numbers)}); only closed-shell reactions")
    rid = str(frames[0].info.get("reaction", os.path.splitext(os.path.basename(path))[0]))
    return Reaction(
        id=rid,
        numbers=np.asarray(numbers, dtype=int),
        reactant=np.asarray(frames[0].positions, dtype=np.float64),
        product=np.asarray(frames[1].positions, dtype=np.float64),
        ts_guess=np.asarray(frames[2].positions, dtype=np.float64) if len(frames) == 3 else None,
        comment=str(frames[0].info.get("comment", "")),
        path=os.path.abspath(path),
    )


def read_reactions(paths: Sequence[str]) -> list[Reaction]:
    """Read reaction xyz files; a ``.txt`` path lists xyz files (one per line, relative to it).

    Raises:
        ReactionFileError: also for two reactions with the same id.
    """
    files: list[str] = []
    for p in paths:
        if p.endswith(".txt"):
            with open(p) as f:
                base = os.path.dirname(os.path.abspath(p))
                files += [os.path.join(base, ln.strip()) for ln in f if ln.strip() and not ln.startswith("#")]
        else:
            files.append(p)
    reactions = [read_reaction(p) for p in files]
    ids = [r.id for r in reactions]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ReactionFileError(f"reaction ids {dup} appear more than once in {files}")
    return reactions


# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class ReactionConfig:
    """How a reaction data set is made (all of it is stored with the data).

    Attributes:
        level: level of theory of every label, optimisation, TS search and IRC.
        guess_xc, guess_basis: the cheap level (PySCF xc name, basis; no dispersion) of the TS
            guess: a climbing-image NEB between the reactant and product (both optimised at
            ``level``) and a Sella saddle search at this level give the start of the saddle
            search at ``level``. Hartree-Fock/3-21G is fast and its saddles lie close to DFT's.
        neb_images: NEB images including the two ends.
        neb_steps: maximum NEB optimiser steps.
        neb_fmax: NEB convergence, eV/Angstrom.
        ts_fmax: Sella convergence, max force eV/Angstrom.
        ts_steps: maximum Sella steps.
        imag_tol_cm: frequencies below -imag_tol_cm count as imaginary, cm^-1 (smaller negative
            ones are numerical noise of the projection).
        irc_dx: IRC step, Angstrom amu^1/2 (mass weighted).
        irc_steps: maximum IRC steps per direction.
        irc_fmax: IRC stops when max force falls below this, eV/Angstrom.
        n_irc: IRC points kept and labelled per direction (evenly spaced along the path).
        n_nms: normal-mode samples per stationary point (reactant, product, TS).
        temperature: NMS temperature, Kelvin.
        min_freq_cm: modes softer than this are not displaced, cm^-1.
        labels: ``"hessian"`` (analytic) or ``"hvp"`` (K finite-difference HVPs per geometry).
        num_probes: K, probes per geometry for ``labels="hvp"``.
        probe_kind: ``"gaussian"`` or ``"onehot"``.
        fd_step: finite-difference displacement for HVP labels, Angstrom.
        endpoint_rmsd: IRC end and reactant/product are the same minimum when their bond graphs
            agree, or (same graph for both ends, e.g. a rotamer) the end is within this RMSD,
            Angstrom, of one and nearer to it than to the other.
        seed: base seed of NMS displacements and probes.
        max_asym_rel, max_sum_rule_rel: Hessian checks (relative to max |H|).
    """

    level: LevelOfTheory = LevelOfTheory()
    guess_xc: str = "hf"
    guess_basis: str = "3-21g"
    neb_images: int = 7
    neb_steps: int = 300
    neb_fmax: float = 0.2
    ts_fmax: float = 0.02
    ts_steps: int = 150
    imag_tol_cm: float = 20.0
    irc_dx: float = 0.15
    irc_steps: int = 40
    irc_fmax: float = 0.1
    n_irc: int = 8
    n_nms: int = 20
    temperature: float = 500.0
    min_freq_cm: float = 50.0
    labels: str = "hessian"
    num_probes: int = 4
    probe_kind: str = "gaussian"
    fd_step: float = 5e-3
    endpoint_rmsd: float = 0.3
    seed: int = 0
    max_asym_rel: float = 1e-4
    max_sum_rule_rel: float = 1e-2

    def __post_init__(self):
        if self.labels not in ("hessian", "hvp"):
            raise ValueError(f"labels must be 'hessian' or 'hvp', got {self.labels!r}")
        if self.probe_kind not in ("gaussian", "onehot"):
            raise ValueError(f"probe_kind must be 'gaussian' or 'onehot', got {self.probe_kind!r}")
        if self.neb_images < 3:
            raise ValueError(f"neb_images must be >= 3, got {self.neb_images}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ReactionConfig:
        d = dict(d)
        d["level"] = LevelOfTheory(**d["level"])
        return cls(**d)


# ----------------------------------------------------------------------------- geometry helpers


def bond_graph(numbers: np.ndarray, positions: np.ndarray, scale: float = 1.2) -> frozenset:
    """Bonded pairs {(i, j)}: distance below ``scale`` times the sum of covalent radii."""
    from ase.data import covalent_radii

    r = covalent_radii[np.asarray(numbers)]
    d = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    i, j = np.nonzero(np.triu(d < scale * (r[:, None] + r[None]), k=1))
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


def count_imaginary(freq_cm: np.ndarray, tol_cm: float = 20.0) -> int:
    """Number of vibrational frequencies below ``-tol_cm`` (imaginary ones are negative), cm^-1."""
    return int(np.sum(np.asarray(freq_cm) < -tol_cm))


def verify_ts(
    numbers: np.ndarray,  # [N]
    positions: np.ndarray,  # [N, 3] Angstrom
    hessian: np.ndarray,  # [N, 3, N, 3] Hartree/Bohr^2
    tol_cm: float = 20.0,
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
    numbers: np.ndarray, end: np.ndarray, reactant: np.ndarray, product: np.ndarray, rmsd_tol: float = 0.3
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


def _sella():
    """Import Sella without its global side effects on JAX.

    ``import sella`` turns on ``jax_enable_x64`` for the whole process, points JAX's compilation
    cache at its own directory and sets ``JAX_PLATFORMS=cpu`` if unset; in a process that also
    trains a model that would silently switch it to float64. We undo all three and run Sella
    inside ``jax.enable_x64(True)`` (see :func:`_x64`) instead.
    """
    import sys

    if "sella" in sys.modules:
        return sys.modules["sella"]
    import jax

    saved = {k: getattr(jax.config, k) for k in ("jax_enable_x64", "jax_compilation_cache_dir",
                                                 "jax_persistent_cache_min_compile_time_secs")}  # fmt: skip
    platforms = os.environ.get("JAX_PLATFORMS")
    import sella

    for k, v in saved.items():
        jax.config.update(k, v)
    if platforms is None:
        os.environ.pop("JAX_PLATFORMS", None)
    return sella


def _x64():
    """Context in which Sella's JAX code runs (it needs float64)."""
    import jax

    return jax.enable_x64(True)


def _atoms(numbers: np.ndarray, positions: np.ndarray):
    from ase import Atoms

    return Atoms(numbers=np.asarray(numbers), positions=np.asarray(positions, dtype=np.float64))


# ----------------------------------------------------------------------------- stages


class _Stage:
    """Paths and failure bookkeeping of one reaction's cache directory."""

    def __init__(self, cache_dir: str, reaction: Reaction):
        self.rxn = reaction
        self.dir = os.path.join(cache_dir, reaction.id)
        os.makedirs(self.dir, exist_ok=True)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def failed(self, name: str) -> dict | None:
        p = self.path(name + ".failed.json")
        return load_json(p) if os.path.exists(p) else None

    def fail(self, name: str, err: Exception | str, **info) -> None:
        log.error("FAILED %s/%s: %s", self.rxn.id, name, err)
        record = {"reaction": self.rxn.id, "stage": name, "reason": str(err), **info}
        save_json(self.path(name + ".failed.json"), record)


def optimize_stage(cfg: ReactionConfig, st: _Stage, role: str) -> dict | None:
    """geomeTRIC minimum of the reactant or product -> ``<role>_opt.npz`` (None if it failed)."""
    out = st.path(f"{role}_opt.npz")
    if os.path.exists(out):
        return load_npz(out)
    if st.failed(f"{role}_opt"):
        return None
    start = getattr(st.rxn, role)
    log.info("optimise %s %s (%d atoms)", st.rxn.id, role, len(start))
    try:
        res = optimize_geometry(st.rxn.numbers, start, cfg.level)
    except Exception as err:  # SCF failure, or geomeTRIC giving up: a recorded failure, not a crash
        st.fail(f"{role}_opt", f"{type(err).__name__}: {err}")
        return None
    save_npz(out, numbers=st.rxn.numbers, start_positions=start, **res)
    log.info("optimised %s %s: E = %.8f Eh, %d steps, %.0f s",
             st.rxn.id, role, res["energy"], res["n_steps"], res["wall"])  # fmt: skip
    return load_npz(out)


def _extra(rid: str, category: str, point: str, index: int, **more) -> dict[str, Any]:
    return {"category": category, "reaction": rid, "point": point, "index": index, "source": SOURCE, **more}


def label_point(
    cfg: ReactionConfig, st: _Stage, stem: str, positions: np.ndarray, extra: dict, force_hessian: bool = False
) -> dict | None:
    """Label one geometry in the configured way (or with a Hessian if ``force_hessian``)."""
    path = st.path(stem)
    if not is_done(path):
        if cfg.labels == "hessian" or force_hessian:
            label_hessian(path, st.rxn.numbers, positions, cfg.level, extra, cfg.max_asym_rel, cfg.max_sum_rule_rel)
        else:
            rng = np.random.default_rng([cfg.seed, zlib.crc32(st.rxn.id.encode()), zlib.crc32(stem.encode())])
            probes = make_probes(cfg.probe_kind, cfg.num_probes, len(st.rxn.numbers), rng)
            label_hvp(path, st.rxn.numbers, positions, probes, cfg.level, extra, cfg.fd_step)
    return load_npz(path + ".npz") if os.path.exists(path + ".npz") else None


def stationary_hessian(cfg: ReactionConfig, st: _Stage, point: str, positions: np.ndarray) -> dict | None:
    """Analytic-Hessian label of a stationary point (``hess_<point>``); in HVP mode its
    finite-difference labels (``rtp_<point>``) are made too and validated against it."""
    extra = _extra(st.rxn.id, "rtp", point, 0)
    rec = label_point(cfg, st, f"hess_{point}" if cfg.labels == "hvp" else f"rtp_{point}", positions, extra, True)
    if rec is not None and cfg.labels == "hvp" and not is_done(st.path(f"rtp_{point}")):
        rng = np.random.default_rng([cfg.seed, zlib.crc32(st.rxn.id.encode()), zlib.crc32(f"rtp_{point}".encode())])
        probes = make_probes(cfg.probe_kind, cfg.num_probes, len(st.rxn.numbers), rng)
        label_hvp(st.path(f"rtp_{point}"), st.rxn.numbers, positions, probes, cfg.level, extra, cfg.fd_step,
                  reference_hessian=rec["hessian"])  # fmt: skip
    return rec


def ts_stage(cfg: ReactionConfig, st: _Stage) -> dict | None:
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
    except Exception as err:  # SCF failure or a Sella/NEB breakdown: recorded, the run goes on
        st.fail("ts", f"{type(err).__name__}: {err}", **info)
        return None
    if not info["converged"]:
        st.fail("ts", f"Sella did not converge to fmax {cfg.ts_fmax} eV/A in {cfg.ts_steps} steps", **info)
        return None
    # The TS Hessian is a helper file until the TS is verified; only then does it become data.
    hess = label_point(cfg, st, "hess_ts", pos, _extra(st.rxn.id, "rtp", "ts", 0), force_hessian=True)
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
    barrier = (float(hess["energy"]) - float(r["energy"])) * 627.5094740631
    log.info("TS %s: %.0f i cm^-1, barrier %.1f kcal/mol, %d Sella steps, %.0f s",
             st.rxn.id, -check["imaginary_cm"], barrier, info["steps"], time.perf_counter() - t0)  # fmt: skip
    return load_npz(done)


def guess_level(cfg: ReactionConfig) -> LevelOfTheory:
    """The cheap level of the NEB and the guess saddle search."""
    return LevelOfTheory(xc=cfg.guess_xc, basis=cfg.guess_basis, grid_level=3, conv_tol=1e-9, dispersion=False)


def _neb_guess(cfg: ReactionConfig, st: _Stage, reactant: np.ndarray, product: np.ndarray) -> np.ndarray:
    """TS guess: the climbing image of an NEB at the guess level, refined to a guess-level saddle."""
    from ase.mep import NEB
    from ase.optimize import FIRE

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
    except Exception as err:  # a failed refinement still leaves the climbing image as a guess
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
    cfg: ReactionConfig, st: _Stage, guess: np.ndarray, level: LevelOfTheory | None = None, log_name: str = "sella.log"
) -> tuple[np.ndarray, dict]:
    """First-order saddle search with Sella from ``guess`` (exact initial Hessian) at ``level``."""
    sella = _sella()
    atoms = _atoms(st.rxn.numbers, guess)
    calc = PySCFCalculator(level or cfg.level)
    atoms.calc = calc
    with _x64():
        opt = sella.Sella(atoms, order=1, internal=True, hessian_function=calc.hessian, logfile=st.path(log_name))
        converged = bool(opt.run(fmax=cfg.ts_fmax, steps=cfg.ts_steps))
    info = {"converged": converged, "steps": int(opt.nsteps), "n_gradients": calc.n_gradients,
            "n_hessians": calc.n_hessians}  # fmt: skip
    return atoms.positions.copy(), info


def irc_stage(cfg: ReactionConfig, st: _Stage) -> dict | None:
    """Sella IRC both ways from the TS, ends relaxed and matched to reactant and product."""
    done = st.path("irc.npz")
    if os.path.exists(done):
        return load_npz(done)
    if st.failed("irc"):
        return None
    sella = _sella()
    ts = load_npz(st.path("ts.npz"))
    t0 = time.perf_counter()
    paths: dict[str, list] = {"forward": [], "reverse": []}
    energies: dict[str, list] = {"forward": [], "reverse": []}
    calc = PySCFCalculator(cfg.level)
    ts_hessian = _hessian_record(st, "ts", cfg)["hessian"]  # [N, 3, N, 3] Hartree/Bohr^2

    def hessian(a):  # the TS Hessian is known; anything else is computed
        if np.allclose(a.positions, ts["positions"], atol=1e-8):
            n = len(a)
            return ts_hessian.reshape(3 * n, 3 * n) * HARTREE_EV / BOHR_ANGSTROM**2
        return calc.hessian(a)

    atoms = _atoms(st.rxn.numbers, ts["positions"])
    atoms.calc = calc
    current = {"dir": "forward"}

    def record():
        paths[current["dir"]].append(atoms.positions.copy())
        energies[current["dir"]].append(atoms.get_potential_energy())

    from sella.optimize.irc import IRCInnerLoopConvergenceFailure

    stopped = {}
    try:
        with _x64():
            irc = sella.IRC(atoms, dx=cfg.irc_dx, hessian_function=hessian, logfile=st.path("irc.log"))
            irc.attach(record)
            for direction in ("forward", "reverse"):
                current["dir"] = direction
                try:
                    irc.run(fmax=cfg.irc_fmax, steps=cfg.irc_steps, direction=direction)
                except IRCInnerLoopConvergenceFailure:
                    # The branch ends at its last good point; relaxing that end decides whether it connects.
                    stopped[direction] = len(paths[direction])
                    log.warning("IRC %s %s: inner loop did not converge after %d points; branch ends there",
                                st.rxn.id, direction, len(paths[direction]))  # fmt: skip
    except Exception as err:  # SCF failure or an IRC breakdown: recorded, the run goes on
        st.fail("irc", f"{type(err).__name__}: {err}")
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
        except Exception as err:
            st.fail("irc", f"relaxing the {direction} end: {type(err).__name__}: {err}")
            return None
        ends[direction] = match_endpoint(st.rxn.numbers, relaxed, r["positions"], p["positions"], cfg.endpoint_rmsd)
    connects = sorted(e for e in ends.values() if e) == ["product", "reactant"]
    if not connects:
        st.fail("irc", f"IRC ends relax to {ends}, not to reactant and product", ends=ends)
        return None
    # Only a TS whose IRC joins reactant and product becomes data (RTP), with its NMS samples.
    if cfg.labels == "hessian":
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


def nms_samples(cfg: ReactionConfig, st: _Stage, point: str, hessian_record: dict) -> dict:
    """Normal-mode samples around a stationary point (drawn once, cached, seeded)."""
    out = st.path(f"nms_{point}_samples.npz")
    if os.path.exists(out):
        return load_npz(out)
    rec = hessian_record
    nm = normal_modes(rec["numbers"], rec["positions"], rec["hessian"])
    rng = np.random.default_rng([cfg.seed, zlib.crc32(st.rxn.id.encode()), zlib.crc32(point.encode())])
    samples, e_harm = sample_normal_modes(rec["positions"], nm["modes"], nm["omega2"], nm["freq_cm"], cfg.n_nms,
                                          cfg.temperature, rng, cfg.min_freq_cm)  # fmt: skip
    save_npz(out, positions=samples, harmonic_energy=e_harm, freq_cm=nm["freq_cm"])
    return load_npz(out)


# ----------------------------------------------------------------------------- the run


def _hessian_record(st: _Stage, point: str, cfg: ReactionConfig) -> dict | None:
    """The analytic-Hessian record of a stationary point (the TS's, verified or not)."""
    names = ["hess_" + point, "rtp_" + point] if cfg.labels == "hessian" else ["hess_" + point]
    for name in names:
        if os.path.exists(st.path(name + ".npz")):
            return load_npz(st.path(name + ".npz"))
    return None


def tasks(cfg: ReactionConfig, reactions: Sequence[Reaction], cache_dir: str) -> Iterator[tuple[str, Any]]:
    """The work as (description, thunk) pairs.

    Order: the structure work of one reaction after another (optimise reactant and product,
    their Hessians, TS, IRC), so each finished reaction is complete and verified early; then
    the labels round robin over reactions (IRC point k of every reaction, then k+1; NMS sample
    k around every stationary point, then k+1), so a partial cache covers every reaction and
    category. A thunk whose prerequisite failed does nothing.
    """
    stages = [_Stage(cache_dir, r) for r in reactions]
    for st in stages:
        for role in ("reactant", "product"):
            yield f"{st.rxn.id}: optimise {role}", lambda st=st, role=role: optimize_stage(cfg, st, role)
        for role in ("reactant", "product"):

            def run_label(st=st, role=role):
                opt = optimize_stage(cfg, st, role)
                if opt is not None:
                    stationary_hessian(cfg, st, role, opt["positions"])

            yield f"{st.rxn.id}: label {role}", run_label

        def run_ts(st=st):
            if all(optimize_stage(cfg, st, r) is not None for r in ("reactant", "product")):
                ts_stage(cfg, st)

        yield f"{st.rxn.id}: transition state", run_ts
        yield f"{st.rxn.id}: IRC", lambda st=st: os.path.exists(st.path("ts.npz")) and irc_stage(cfg, st)
    for k in range(cfg.n_irc):
        for st in stages:
            for direction in ("forward", "reverse"):

                def run_irc_label(st=st, direction=direction, k=k):
                    if not os.path.exists(st.path("irc.npz")):
                        return
                    irc = load_npz(st.path("irc.npz"))
                    idx = irc_points(irc[direction], cfg.n_irc)
                    if k < len(idx):
                        extra = _extra(st.rxn.id, "irc", f"irc_{direction}", int(idx[k]),
                                       irc_energy_eV=float(irc[f"energies_{direction}_eV"][idx[k]]))  # fmt: skip
                        label_point(cfg, st, f"irc_{direction}_{k + 1:02d}", irc[direction][idx[k]], extra)

                yield f"{st.rxn.id}: IRC {direction} point {k + 1}", run_irc_label
    for k in range(cfg.n_nms):
        for st in stages:
            for point in STATIONARY:

                def run_nms(st=st, point=point, k=k):
                    rec = _hessian_record(st, point, cfg)
                    if rec is None or (point == "ts" and not os.path.exists(st.path("irc.npz"))):
                        return
                    smp = nms_samples(cfg, st, point, rec)
                    e_harm = float(smp["harmonic_energy"][k])
                    extra = _extra(st.rxn.id, "nms", f"nms_{point}", k + 1, harmonic_energy=e_harm, T=cfg.temperature)
                    label_point(cfg, st, f"nms_{point}_{k + 1:03d}", smp["positions"][k], extra)

                yield f"{st.rxn.id}: NMS {point} {k + 1}", run_nms


def run(cfg: ReactionConfig, reactions: Sequence[Reaction], cache_dir: str, progress: bool = True) -> dict:
    """Run (or resume) the whole pipeline; returns :func:`summarize` of the cache.

    The configuration is stored in ``<cache_dir>/config.json``; resuming with a different one is
    refused (the cached results would silently mix two settings).

    Raises:
        ValueError: if ``cache_dir`` was made with another configuration.
    """
    os.makedirs(cache_dir, exist_ok=True)
    cfg_path = os.path.join(cache_dir, "config.json")
    if os.path.exists(cfg_path):
        old = ReactionConfig.from_json(load_json(cfg_path))
        if old != cfg:
            raise ValueError(f"{cfg_path}: the cache was made with another configuration:\n{old}\nnow:\n{cfg}")
    else:
        save_json(cfg_path, cfg.to_json())
    for r in reactions:
        save_json(os.path.join(cache_dir, f"{r.id}.reaction.json"), {"id": r.id, "comment": r.comment,
                  "path": r.path, "numbers": r.numbers, "reactant": r.reactant, "product": r.product})  # fmt: skip
    work = list(tasks(cfg, reactions, cache_dir))
    log.info("run: %d reactions, %d tasks, cache %s", len(reactions), len(work), cache_dir)
    from tqdm import tqdm

    bar = tqdm(work, disable=not progress, unit="task", smoothing=0.05, dynamic_ncols=True)
    for desc, thunk in bar:
        bar.set_description(desc[:48])
        thunk()
    return summarize(cache_dir)


# ----------------------------------------------------------------------------- results


def cached_records(cache_dir: str, category: str | None = None) -> list[dict[str, Any]]:
    """Every labelled geometry of the cache (the data, not the helper Hessians), sorted by path."""
    out = []
    for cat in [category] if category else CATEGORIES:
        for p in sorted(glob.glob(os.path.join(cache_dir, "*", _PATTERNS[cat]))):
            out.append(load_npz(p))
    return out


def assemble(cache_dir: str, out_dir: str, prefix: str = "chon_reactions") -> dict[str, Any]:
    """Write ``<prefix>-RTP.h5``, ``-IRC.h5`` and ``-NMS.h5`` (ANI layout, Hartree/Angstrom).

    Runs on a partial cache too; returns :func:`summarize` plus the written paths.
    """
    from phljax.data import write_h5

    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for cat in CATEGORIES:
        recs = cached_records(cache_dir, cat)
        if not recs:
            continue
        path = os.path.join(out_dir, f"{prefix}-{cat.upper()}.h5")
        write_h5(path, to_molecules(recs))
        written[cat] = path
        log.info("assembled %d %s geometries into %s", len(recs), cat.upper(), path)
    summary = summarize(cache_dir)
    summary["files"] = {k: os.path.basename(v) for k, v in written.items()}
    save_json(os.path.join(cache_dir, "summary.json"), summary)
    return summary


def summarize(cache_dir: str) -> dict[str, Any]:
    """Counts per reaction and category, barriers, failures, compute time (JSON-ready).

    Energies kcal/mol, times seconds, frequencies cm^-1.
    """
    kcal = 627.5094740631
    per: dict[str, Any] = {}
    wall = 0.0
    for rx_path in sorted(glob.glob(os.path.join(cache_dir, "*.reaction.json"))):
        rx = load_json(rx_path)
        rid = rx["id"]
        d = os.path.join(cache_dir, rid)
        info: dict[str, Any] = {"comment": rx["comment"], "n_atoms": len(rx["numbers"])}
        for cat in CATEGORIES:
            info[f"n_{cat}"] = 0
        for rec in cached_records_of(d):
            info[f"n_{str(rec['category'])}"] += 1
            wall += float(rec["wall_total"])
        helper = [load_npz(p) for p in glob.glob(os.path.join(d, "hess_*.npz"))]
        wall += sum(float(h["wall_total"]) for h in helper)
        for name in ("reactant_opt", "product_opt", "ts", "irc"):
            p = os.path.join(d, name + ".npz")
            if os.path.exists(p):
                wall += float(load_npz(p)["wall"])  # the TS's includes its NEB
        ts_p = os.path.join(d, "ts.npz")
        if os.path.exists(ts_p):
            ts = load_npz(ts_p)
            info["imaginary_cm"] = round(float(ts["imaginary_cm"]), 1)
            r_p = os.path.join(d, "reactant_opt.npz")
            p_p = os.path.join(d, "product_opt.npz")
            info["barrier_kcal"] = round((float(ts["energy"]) - float(load_npz(r_p)["energy"])) * kcal, 2)
            info["reaction_energy_kcal"] = round(
                (float(load_npz(p_p)["energy"]) - float(load_npz(r_p)["energy"])) * kcal, 2
            )
        fails = [load_json(p) for p in sorted(glob.glob(os.path.join(d, "*.failed.json")))]
        rejected = [load_json(p) for p in sorted(glob.glob(os.path.join(d, "*.rejected.json")))]
        info["failures"] = [f"{f['stage']}: {f['reason']}" for f in fails]
        info["rejected"] = [f"{r['where']}: {r['reason']}" for r in rejected]
        fd = [float(load_npz(p)["fd_rel_error"]) for p in glob.glob(os.path.join(d, "rtp_*.npz"))
              if "fd_rel_error" in np.load(p).files]  # fmt: skip
        if fd:
            info["fd_rel_error_max"] = max(fd)
        per[rid] = info
    totals = {f"n_{c}": sum(v[f"n_{c}"] for v in per.values()) for c in CATEGORIES}
    cfg_path = os.path.join(cache_dir, "config.json")
    return {
        "reactions": per,
        **totals,
        "n_geometries": sum(totals.values()),
        "n_failed_reactions": sum(bool(v["failures"]) for v in per.values()),
        "compute_s": wall,
        "config": load_json(cfg_path) if os.path.exists(cfg_path) else None,
    }


def cached_records_of(reaction_dir: str) -> Iterator[dict[str, Any]]:
    """The labelled data geometries of one reaction's cache directory."""
    for pat in _PATTERNS.values():
        for p in sorted(glob.glob(os.path.join(reaction_dir, pat))):
            yield load_npz(p)
