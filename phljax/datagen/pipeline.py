"""Resumable generation of the bundled NMS data set (phljax/data/bundled/chon_nms_small.h5).

The work is a list of small tasks, each of which writes one file into a cache directory the
moment it finishes (atomically: temporary file, then rename), so a killed run loses at most the
calculation in flight and a restart recomputes nothing that is already there:

    <name>_opt.npz          geomeTRIC minimum (positions Angstrom, energy Hartree, steps, wall s)
    <name>_0000.npz         the minimum itself, labelled (energy, gradient, Hessian)
    <name>_samples.npz      the normal-mode-sampled geometries drawn from the minimum's Hessian
    <name>_<k>.npz, k >= 1  each sampled geometry, labelled
    <name>_<k>.rejected.json   a geometry whose SCF or Hessian check failed (not data)
    log.txt                 progress log

Tasks are ordered round robin (all optimisations, then all minima, then sample 1 of every
molecule, sample 2 of every molecule, ...), so a partial cache covers every molecule. Sampling
is deterministic given the seed and the cached minimum.

Units in the cache are atomic (Hartree, Bohr) except positions (Angstrom); :func:`assemble`
converts to phljax's internal eV and Angstrom and writes the ANI-layout HDF5 file.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from phljax.datagen.cache import load_npz as _load_npz
from phljax.datagen.cache import save_json as _save_json
from phljax.datagen.cache import save_npz as _save_npz
from phljax.datagen.dft import (
    OPT_CONVERGENCE,
    LevelOfTheory,
    SCFNotConvergedError,
    optimize_geometry,
)
from phljax.datagen.labels import label_hessian
from phljax.datagen.labels import to_molecules as to_molecules_
from phljax.datagen.sampling import normal_modes, sample_normal_modes

log = logging.getLogger("phljax.datagen")

SOURCE = "phljax.datagen (PySCF omegaB97X-D/6-31G(d) + CHG dispersion)"

_HNCO = (  # isocyanic acid, planar trans-bent start (Angstrom); not in ase's g2 collection
    [1, 7, 6, 8],
    [[-0.565, 0.837, 0.0], [0.0, 0.0, 0.0], [1.210, 0.0, 0.0], [2.369, -0.163, 0.0]],
)
#: Molecules of the bundled set: name -> ase g2 name or (numbers, positions Angstrom).
MOLECULES: dict[str, Any] = {
    "h2o": "H2O",
    "nh3": "NH3",
    "ch4": "CH4",
    "hcn": "HCN",
    "h2co": "H2CO",
    "hnco": _HNCO,
    "hcooh": "HCOOH",
    "ch3oh": "CH3OH",
}


@dataclasses.dataclass(frozen=True)
class NMSConfig:
    """What the bundled NMS set is made of.

    Attributes:
        molecules: names (keys of :data:`MOLECULES`), in round-robin order.
        n_samples: distorted geometries per molecule (plus the minimum itself).
        temperature: NMS temperature, Kelvin.
        seed: base seed; molecule ``name`` uses ``default_rng([seed, crc32(name)])``.
        min_freq_cm: modes softer than this (cm^-1) are not displaced.
        max_asym_rel: Hessian symmetry threshold, max|H - H^T| / max|H|.
        max_sum_rule_rel: translational sum-rule threshold, max|sum_j H_ij| / max|H|.
        level: the level of theory.
    """

    molecules: tuple[str, ...] = tuple(MOLECULES)
    n_samples: int = 30
    temperature: float = 500.0
    seed: int = 0
    min_freq_cm: float = 50.0
    max_asym_rel: float = 1e-4
    max_sum_rule_rel: float = 1e-2
    level: LevelOfTheory = LevelOfTheory()


def start_geometry(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Starting geometry of a bundled molecule: (numbers [N] int, positions [N, 3] Angstrom).

    Raises:
        KeyError: for an unknown name.
    """
    spec = MOLECULES[name]
    if isinstance(spec, str):
        from ase.build import molecule

        atoms = molecule(spec)
        return np.asarray(atoms.numbers, dtype=int), np.asarray(atoms.positions, dtype=np.float64)
    numbers, positions = spec
    return np.asarray(numbers, dtype=int), np.asarray(positions, dtype=np.float64)


# ----------------------------------------------------------------------------- cache files


def _paths(cache_dir: str, name: str, index: int | str) -> str:
    if isinstance(index, int):
        return os.path.join(cache_dir, f"{name}_{index:04d}")
    return os.path.join(cache_dir, f"{name}_{index}")


def _done(cache_dir: str, name: str, index: int) -> bool:
    stem = _paths(cache_dir, name, index)
    return os.path.exists(stem + ".npz") or os.path.exists(stem + ".rejected.json")


# ----------------------------------------------------------------------------- tasks


def optimize_task(cfg: NMSConfig, cache_dir: str, name: str) -> dict[str, Any]:
    """Optimise molecule ``name`` (cached in ``<name>_opt.npz``); returns the cached dict."""
    path = _paths(cache_dir, name, "opt") + ".npz"
    if os.path.exists(path):
        return _load_npz(path)
    numbers, start = start_geometry(name)
    log.info("optimise %s (%d atoms)", name, len(numbers))
    res = optimize_geometry(numbers, start, cfg.level)
    _save_npz(
        path,
        numbers=numbers,
        start_positions=start,
        positions=res["positions"],
        energy=res["energy"],
        n_steps=res["n_steps"],
        gmax=res["gmax"],
        converged=res["converged"],
        convergence=json.dumps(OPT_CONVERGENCE),
        wall=res["wall"],
        level=json.dumps(cfg.level.describe()),
    )
    log.info(
        "optimised %s: E = %.8f Eh, max|g| = %.1e Eh/a0, %d steps, %.1f s%s",
        name, res["energy"], res["gmax"], res["n_steps"], res["wall"],
        "" if res["converged"] else " (criteria NOT met, accepted on max|g|)",
    )  # fmt: skip
    return _load_npz(path)


def label_task(
    cfg: NMSConfig, cache_dir: str, name: str, index: int, positions: np.ndarray, numbers: np.ndarray, extra: dict
) -> bool:
    """Label one geometry and cache it; returns True if written, False if rejected."""
    meta = {"name": name, "index": index, "category": "nms", "source": SOURCE, **extra}
    return label_hessian(
        _paths(cache_dir, name, index), numbers, positions, cfg.level, meta, cfg.max_asym_rel, cfg.max_sum_rule_rel
    )


def samples_task(cfg: NMSConfig, cache_dir: str, name: str) -> dict[str, Any]:
    """Draw (once) and cache the NMS geometries of ``name`` from its labelled minimum."""
    path = _paths(cache_dir, name, "samples") + ".npz"
    if os.path.exists(path):
        return _load_npz(path)
    minimum = _load_npz(_paths(cache_dir, name, 0) + ".npz")
    nm = normal_modes(minimum["numbers"], minimum["positions"], minimum["hessian"])
    n_imag = int(np.sum(nm["freq_cm"] < 0))
    if n_imag:
        log.warning("%s minimum has %d imaginary mode(s): %s cm^-1", name, n_imag, nm["freq_cm"][nm["freq_cm"] < 0])
    rng = np.random.default_rng([cfg.seed, zlib.crc32(name.encode())])
    samples, e_harm = sample_normal_modes(
        minimum["positions"], nm["modes"], nm["omega2"], nm["freq_cm"], cfg.n_samples,
        cfg.temperature, rng, cfg.min_freq_cm,
    )  # fmt: skip
    _save_npz(
        path,
        positions=samples,
        harmonic_energy=e_harm,
        freq_cm=nm["freq_cm"],
        temperature=cfg.temperature,
        seed=cfg.seed,
    )
    log.info(
        "sampled %s: %d geometries at %.0f K, freqs %s cm^-1, mean harmonic energy %.2e Eh, "
        "max |dR| %.3f A",
        name, cfg.n_samples, cfg.temperature, np.round(nm["freq_cm"]).astype(int).tolist(),
        e_harm.mean(), np.abs(samples - minimum["positions"][None]).max(),
    )  # fmt: skip
    return _load_npz(path)


def task_order(cfg: NMSConfig) -> Iterator[tuple[str, str, int]]:
    """The round-robin task list: ("opt", name, 0), ("label", name, 0), ("label", name, k)..."""
    for name in cfg.molecules:
        yield "opt", name, 0
    for name in cfg.molecules:
        yield "label", name, 0
    for k in range(1, cfg.n_samples + 1):
        for name in cfg.molecules:
            yield "label", name, k


def run(cfg: NMSConfig, cache_dir: str, on_progress: Callable[[], None] | None = None) -> None:
    """Run (or resume) every task of ``cfg`` not yet in ``cache_dir``.

    Args:
        cfg: the data-set definition.
        cache_dir: cache directory (created if missing).
        on_progress: optional callback after every finished labelled geometry (e.g. assemble).
    """
    os.makedirs(cache_dir, exist_ok=True)
    tasks = list(task_order(cfg))
    todo = [t for t in tasks if not (t[0] == "label" and _done(cache_dir, t[1], t[2]))]
    log.info("run: %d of %d tasks left (cfg %s)", len(todo), len(tasks), dataclasses.asdict(cfg))
    t_start = time.perf_counter()
    n_done = 0
    n_label_todo = sum(t[0] == "label" for t in todo)
    for kind, name, k in todo:
        if kind == "opt":
            try:
                optimize_task(cfg, cache_dir, name)
            except SCFNotConvergedError as err:
                log.error("optimisation of %s failed: %s; skipping the molecule", name, err)
            continue
        opt_path = _paths(cache_dir, name, "opt") + ".npz"
        if not os.path.exists(opt_path):
            continue  # optimisation failed above
        opt = _load_npz(opt_path)
        if k == 0:
            label_task(cfg, cache_dir, name, 0, opt["positions"], opt["numbers"], {"kind": "minimum"})
        else:
            if not os.path.exists(_paths(cache_dir, name, 0) + ".npz"):
                continue
            samples = samples_task(cfg, cache_dir, name)
            label_task(
                cfg, cache_dir, name, k, samples["positions"][k - 1], opt["numbers"],
                {"kind": "nms", "harmonic_energy": samples["harmonic_energy"][k - 1],
                 "temperature": cfg.temperature, "seed": cfg.seed},
            )  # fmt: skip
        n_done += 1
        elapsed = time.perf_counter() - t_start
        left = n_label_todo - n_done
        log.info(
            "progress: %d/%d labelled this run, %.0f s elapsed, ~%.0f s left",
            n_done,
            n_label_todo,
            elapsed,
            elapsed / n_done * left,
        )
        if on_progress is not None:
            on_progress()


# ----------------------------------------------------------------------------- assembling


def cached_records(cache_dir: str) -> list[dict[str, Any]]:
    """All labelled geometries in ``cache_dir`` (sorted by molecule, then index), as dicts."""
    out = []
    for path in sorted(glob.glob(os.path.join(cache_dir, "*_[0-9][0-9][0-9][0-9].npz"))):
        out.append(_load_npz(path))
    return out


def to_molecules(records: list[dict[str, Any]], symmetrize: bool = True) -> list:
    """Cached records -> ``phljax.data.Molecule`` (eV, Angstrom), see :func:`labels.to_molecules`;
    records from before the category/source fields get ``category = "nms"`` and the source."""
    mols = to_molecules_(records, symmetrize)
    for m in mols:
        m.meta.setdefault("category", "nms")
        m.meta.setdefault("source", SOURCE)
        m.meta.setdefault("kind", "nms")
    return mols


def summarize(records: list[dict[str, Any]], cache_dir: str | None = None) -> dict[str, Any]:
    """Per-molecule counts, sizes, sum-rule statistics, energy spread and compute time.

    Args:
        records: from :func:`cached_records`.
        cache_dir: if given, also read optimisation steps/times, harmonic frequencies and the
            number of rejected geometries from it.

    Returns:
        A JSON-ready dict (energies in Hartree and kcal/mol as named, times in seconds,
        relative errors dimensionless, frequencies in cm^-1, displacements in Angstrom).
    """
    from ase import Atoms

    hartree_kcal = 627.5094740631
    by_name: dict[str, list] = {}
    for r in records:
        by_name.setdefault(str(r["name"]), []).append(r)
    per = {}
    for name, rs in by_name.items():
        rs = sorted(rs, key=lambda r: int(r["index"]))
        sr = np.array([float(r["sum_rule_rel"]) for r in rs])
        energies = np.array([float(r["energy"]) for r in rs])
        e_min = energies[0] if int(rs[0]["index"]) == 0 else energies.min()
        numbers = np.asarray(rs[0]["numbers"])
        info = {
            "formula": Atoms(numbers=numbers).get_chemical_formula(mode="hill"),
            "n_atoms": int(len(numbers)),
            "n_geometries": len(rs),
            "energy_minimum_hartree": float(e_min),
            "energy_above_min_kcal_mean": float((energies - e_min).mean() * hartree_kcal),
            "energy_above_min_kcal_max": float((energies - e_min).max() * hartree_kcal),
            "dispersion_energy_hartree_mean": float(np.mean([float(r["energy_disp"]) for r in rs])),
            "max_abs_force_eV_per_A": float(
                max(np.abs(r["gradient"]).max() for r in rs) * 27.211386245988 / 0.529177210903
            ),
            "sum_rule_rel_median": float(np.median(sr)),
            "sum_rule_rel_max": float(sr.max()),
            "wall_s": float(sum(float(r["wall_total"]) for r in rs)),
        }
        if int(rs[0]["index"]) == 0 and len(rs) > 1:
            disp = np.stack([r["positions"] for r in rs[1:]]) - rs[0]["positions"][None]
            info["max_displacement_A"] = float(np.linalg.norm(disp, axis=-1).max())
            info["rms_displacement_A"] = float(np.sqrt((disp**2).sum(-1).mean()))
        if cache_dir is not None:
            opt_path = _paths(cache_dir, name, "opt") + ".npz"
            if os.path.exists(opt_path):
                opt = _load_npz(opt_path)
                info["opt_steps"] = int(opt["n_steps"])
                info["opt_wall_s"] = float(opt["wall"])
                if "gmax" in opt:
                    info["opt_gmax"] = float(opt["gmax"])
                    info["opt_converged"] = bool(opt["converged"])
            smp_path = _paths(cache_dir, name, "samples") + ".npz"
            if os.path.exists(smp_path):
                info["freq_cm"] = np.round(_load_npz(smp_path)["freq_cm"], 1).tolist()
        per[name] = info
    sr_all = np.array([float(r["sum_rule_rel"]) for r in records]) if records else np.zeros(1)
    asym_all = np.array([float(r["asym_rel"]) for r in records]) if records else np.zeros(1)
    out = {
        "molecules": per,
        "n_geometries": len(records),
        "sum_rule_rel_median": float(np.median(sr_all)),
        "sum_rule_rel_p95": float(np.percentile(sr_all, 95)),
        "sum_rule_rel_max": float(sr_all.max()),
        "asym_rel_max": float(asym_all.max()),
        "wall_label_s": float(sum(float(r["wall_total"]) for r in records)),
    }
    if cache_dir is not None:
        out["wall_opt_s"] = float(sum(m.get("opt_wall_s", 0.0) for m in per.values()))
        out["n_rejected"] = len(glob.glob(os.path.join(cache_dir, "*.rejected.json")))
        if records:
            out["level"] = json.loads(str(records[0]["level"]))
    return out


def assemble(cache_dir: str, out_path: str) -> dict[str, Any]:
    """Write every labelled geometry of ``cache_dir`` to ``out_path`` (ANI-layout HDF5).

    Runs on a partial cache too. Returns :func:`summarize` of what was written, plus the
    geomeTRIC wall time and the number of rejected geometries.
    """
    from phljax.data import write_h5

    records = cached_records(cache_dir)
    if not records:
        raise FileNotFoundError(f"no labelled geometries in {cache_dir}")
    mols = to_molecules(records)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    write_h5(out_path, mols)
    summary = summarize(records, cache_dir)
    _save_json(os.path.join(cache_dir, "summary.json"), summary)
    log.info("assembled %d geometries into %s", len(mols), out_path)
    return summary


def setup_logging(cache_dir: str) -> None:
    """Log to ``<cache_dir>/log.txt`` (appending) and to stderr."""
    os.makedirs(cache_dir, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    root = logging.getLogger("phljax.datagen")
    root.setLevel(logging.INFO)
    root.propagate = False  # geomeTRIC configures the root logger with its own handlers
    root.handlers.clear()
    for handler in (logging.FileHandler(os.path.join(cache_dir, "log.txt")), logging.StreamHandler()):
        handler.setFormatter(fmt)
        root.addHandler(handler)
