"""The size-scaling data set: C/H/N/O molecules of 10 to ~180 atoms with GFN2-xTB labels (the `scale` extra).

For each molecule of :data:`SCALE_MOLECULES` (SMILES; alkanes, alcohols, amides and peptides,
rings and aromatics, larger flexible molecules, in the size bins :data:`SIZE_BINS`; both live in
:mod:`phljax.datagen.molecules` with the RDKit conformer code and are re-exported here):

1. a 3D conformer by RDKit's ETKDG (v3) with a fixed seed, relaxed with GFN2-xTB (ASE's LBFGS to
   ``fmax`` eV/Angstrom, :func:`phljax.datagen.xtb.relax`);
2. a checked finite-difference Hessian at the minimum (:func:`phljax.datagen.xtb.fd_hessian`);
3. ``n_nms`` normal-mode samples around it, drawn exactly as for the reaction set
   (:mod:`phljax.datagen.sampling`: classical harmonic Boltzmann at ``temperature``, soft and
   rotation-like modes not displaced), seeded by ``default_rng([seed, crc32(name)])``;
4. labels of every sample: energy and forces; a full FD Hessian for the test subset
   (``n_test_per_bin`` samples per size bin, taken round-robin over the bin's molecules, the
   first samples of each) and for the training samples of molecules of at most
   ``train_hessian_max_atoms`` atoms; and on every training sample a *probe pool*: for each kind
   of ``pool_kinds`` (one-hot, Gaussian, Rademacher) ``pool_size`` probes and their reference
   HVPs, exact products with the FD Hessian where the sample has one, else central differences of
   gradients (2 per probe). The pools are what Hessian-free training (``--probe-mode data``) of
   each probe family reads, at every size, so one-hot and random probes meet the same samples.

The level of theory differs from the DFT reaction set on purpose: the scaling questions are about
the training method, so any consistent reference surface serves (see the data card).

Cache (``<cache>/<name>/``, atomic units as :mod:`phljax.datagen.labels`): ``minimum.npz``,
``minimum_hessian.npz``, ``samples.npz``, ``nms_<k>.npz``; a failed step is
``<stem>.rejected.json`` instead. Every file is written the moment it is computed, so a killed
run resumes where it stopped. :func:`assemble` writes ``<prefix>-train.h5`` (E, F, and H where
stored), ``<prefix>-train-<kind>.h5`` per pool kind (E, F and that kind's pool as ``hvp_probes`` /
``hvps``), ``<prefix>-test.h5`` (E, F, H) and ``<prefix>-minima.h5`` (E, F, H of each minimum) in
the ANI layout of :func:`phljax.data.write_h5`.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import logging
import os
import time
import zlib
from typing import Any

import numpy as np

from phljax.data import write_h5
from phljax.datagen.cache import load_json, load_npz, save_json, save_npz
from phljax.datagen.dft import HessianCheckError, SCFNotConvergedError
from phljax.datagen.labels import PROBE_KINDS, is_done, make_probes, to_molecules
from phljax.datagen.molecules import SCALE_MOLECULES, SIZE_BINS, ScaleMolecule, conformer, count_atoms, size_bin
from phljax.datagen.sampling import (
    MIN_FREQ_CM,
    NMS_TEMPERATURE,
    normal_modes,
    rectilinear_stretch,
    sample_normal_modes,
)
from phljax.datagen.xtb import XTB_FD_STEP, XTB_HESSIAN_LIMITS, XTBHessianLimits, XTBLevel, fd_hessian, fd_hvp, relax
from phljax.datagen.xtb import singlepoint as xtb_singlepoint

log = logging.getLogger("phljax.datagen")

__all__ = [
    "SIZE_BINS",
    "SCALE_MOLECULES",
    "ScaleMolecule",
    "ScaleConfig",
    "size_bin",
    "count_atoms",
    "conformer",
    "n_test_samples",
    "label_kind",
    "run",
    "run_molecule",
    "assemble",
    "summarize",
]

SOURCE = "phljax.datagen.scale (GFN2-xTB via tblite)"


@dataclasses.dataclass(frozen=True)
class ScaleConfig:
    """Everything that fixes the scaling set (a cache is resumed only with the same one).

    Attributes:
        level: xTB settings.
        molecules: the molecules (test subsets are assigned over all of them, whichever are run).
        seed: ETKDG seed, and first word of every NMS and probe seed.
        fmax: LBFGS convergence of the minima, max per-atom |force|, eV/Angstrom.
        max_steps: LBFGS steps allowed.
        n_nms: normal-mode samples per molecule.
        temperature: NMS temperature, Kelvin.
        min_freq_cm: modes softer than this (cm^-1) are not displaced.
        max_rectilinear_stretch: rotation-like modes above this (see
            :func:`phljax.datagen.sampling.rectilinear_stretch`) are not displaced (the reaction
            set's value).
        n_test_per_bin: samples per size bin labelled with a full Hessian (the test subset).
        train_hessian_max_atoms: training samples of molecules of at most this many atoms get a
            full FD Hessian too (0: none does); the randomized regime and E-F-H train on them.
        pool_kinds: probe kinds of the pools (:data:`phljax.datagen.labels.PROBE_KINDS`).
        pool_size: probes per kind in each training sample's pool.
        fd_step: finite-difference step of Hessians and HVPs, Angstrom.
        check_columns: Hessian columns checked against step 2 fd_step.
        limits: Hessian acceptance limits.
        size_bins: edges of the size bins (see :func:`size_bin`); every molecule must fall in one.
    """

    level: XTBLevel = XTBLevel()
    molecules: tuple[ScaleMolecule, ...] = SCALE_MOLECULES
    seed: int = 0
    fmax: float = 0.01
    max_steps: int = 3000
    n_nms: int = 30
    temperature: float = NMS_TEMPERATURE
    min_freq_cm: float = MIN_FREQ_CM
    max_rectilinear_stretch: float = 0.04
    n_test_per_bin: int = 8
    train_hessian_max_atoms: int = 40
    pool_kinds: tuple[str, ...] = ("onehot", "gaussian", "rademacher")
    pool_size: int = 4
    fd_step: float = XTB_FD_STEP
    check_columns: int = 6
    limits: XTBHessianLimits = XTB_HESSIAN_LIMITS
    size_bins: tuple[int, ...] = SIZE_BINS

    def __post_init__(self):
        names = [m.name for m in self.molecules]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"molecule names must be unique and non-empty, got {names}")
        bad = [n for n in names if not n.replace("_", "").isalnum()]
        if bad:
            raise ValueError(f"molecule names must be letters, digits and '_' (cache directories): {bad}")
        bad = sorted(set(self.pool_kinds) - set(PROBE_KINDS))
        if bad or len(set(self.pool_kinds)) != len(self.pool_kinds):
            raise ValueError(f"pool_kinds must be distinct kinds of {PROBE_KINDS}, got {list(self.pool_kinds)}")
        if self.n_nms < 1 or self.pool_size < 0 or self.n_test_per_bin < 0:
            raise ValueError(f"need n_nms >= 1, pool_size >= 0, n_test_per_bin >= 0, got "
                             f"{self.n_nms}, {self.pool_size}, {self.n_test_per_bin}")  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ScaleConfig:
        d = dict(d)
        d["level"] = XTBLevel(**d["level"])
        d["molecules"] = tuple(ScaleMolecule(**m) for m in d["molecules"])
        d["limits"] = XTBHessianLimits(**d["limits"])
        d["size_bins"] = tuple(d["size_bins"])
        d["pool_kinds"] = tuple(d["pool_kinds"])
        return cls(**d)


def n_test_samples(cfg: ScaleConfig) -> dict[str, int]:
    """How many leading samples of each molecule form the test subset (full Hessians).

    Per size bin, ``cfg.n_test_per_bin`` samples are dealt round-robin over the bin's molecules in
    the order of ``cfg.molecules`` (sample 0 of each, then sample 1, ...), at most ``n_nms`` each.
    """
    by_bin: dict[str, list[str]] = collections.defaultdict(list)
    for m in cfg.molecules:
        by_bin[size_bin(count_atoms(m.smiles), cfg.size_bins)].append(m.name)
    out = {}
    for names in by_bin.values():
        for j, name in enumerate(names):
            out[name] = min(cfg.n_nms, max(0, -(-(cfg.n_test_per_bin - j) // len(names))))
    return out


def label_kind(cfg: ScaleConfig, n_atoms: int, index: int, n_test: int) -> str:
    """``'hessian'`` (test subset), ``'train_hessian'`` (training sample of a small molecule: full
    Hessian and pools from it) or ``'pool'`` (training sample: E, F and FD pools)."""
    if index < n_test:
        return "hessian"
    return "train_hessian" if n_atoms <= cfg.train_hessian_max_atoms else "pool"


def pool_probes(cfg: ScaleConfig, n_atoms: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The probe pool of one training sample: ``{kind: [pool_size, N, 3]}``, drawn in ``pool_kinds`` order."""
    return {kind: make_probes(kind, cfg.pool_size, n_atoms, rng) for kind in cfg.pool_kinds}


def _reject(stem: str, err: Exception, positions: np.ndarray, **info) -> None:
    where = os.path.join(os.path.basename(os.path.dirname(stem)), os.path.basename(stem))
    log.warning("REJECT %s: %s", where, err)
    save_json(stem + ".rejected.json", {"where": where, "reason": str(err), "positions": np.asarray(positions), **info})


def _label(stem: str, cfg: ScaleConfig, kind: str, numbers, positions, meta: dict[str, Any], rng) -> None:
    """Label one geometry (``kind`` of :func:`label_kind`) into ``<stem>.npz`` (or reject it).

    A training sample's pools (``pool_<kind>_probes`` / ``pool_<kind>_hvps``, Hartree/Bohr^2 per
    unit probe) are exact products with its FD Hessian (``train_hessian``) or FD HVPs (``pool``).
    """
    t0 = time.perf_counter()
    n = len(numbers)
    try:
        extra: dict[str, Any] = {}
        if kind in ("hessian", "train_hessian"):
            out = fd_hessian(numbers, positions, cfg.level, cfg.fd_step, cfg.check_columns, cfg.limits)
            extra = {k: out[k] for k in ("hessian", "asym_rel", "sum_rule_rel", "step_rel", "fd_step")}
        if kind == "train_hessian":
            h = np.asarray(out["hessian"]).reshape(3 * n, 3 * n)
            h = 0.5 * (h + h.T)  # as phljax.datagen.labels.to_molecules stores it
            for name, v in pool_probes(cfg, n, rng).items():
                extra[f"pool_{name}_probes"] = v
                extra[f"pool_{name}_hvps"] = (v.reshape(len(v), -1) @ h).reshape(v.shape)
        elif kind == "pool":
            pools = pool_probes(cfg, n, rng)
            names = list(pools)
            if names and cfg.pool_size:
                out = fd_hvp(numbers, positions, np.concatenate([pools[k] for k in names]), cfg.level, cfg.fd_step)
                for j, name in enumerate(names):
                    extra[f"pool_{name}_probes"] = pools[name]
                    extra[f"pool_{name}_hvps"] = out["hvps"][j * cfg.pool_size : (j + 1) * cfg.pool_size]
                extra["fd_step"] = cfg.fd_step
            else:
                out = xtb_singlepoint(numbers, positions, cfg.level)
        elif kind != "hessian":
            raise ValueError(f"unknown label kind {kind!r}")
    except (SCFNotConvergedError, HessianCheckError) as err:
        _reject(stem, err, positions, labels=kind)
        return
    wall = time.perf_counter() - t0
    save_npz(
        stem + ".npz",
        numbers=np.asarray(numbers),
        positions=np.asarray(positions),
        energy=out["energy"],
        gradient=out["gradient"],
        labels=kind,
        n_gradients=out.get("n_gradients", 1),
        wall_total=wall,
        level=json.dumps(cfg.level.describe()),
        source=SOURCE,
        **extra,
        **meta,
    )
    log.info("labelled %s (%s): E = %.8f Eh, |g|max = %.2e Eh/a0, %d gradients, %.1f s",
             os.path.basename(stem), kind, out["energy"], np.abs(out["gradient"]).max(),
             out.get("n_gradients", 1), wall)  # fmt: skip


def run_molecule(cfg: ScaleConfig, mol: ScaleMolecule, cache_dir: str, n_test: int) -> bool:
    """Minimum, its Hessian, normal-mode samples and their labels of one molecule (resumes).

    Returns False if ``<cache_dir>/STOP`` appeared (checked before each calculation), else True.
    A conformer that ETKDG cannot embed, or a minimum that LBFGS does not reach, is rejected (the
    molecule then has no samples); so is a sample whose SCC or Hessian check fails.
    """
    d = os.path.join(cache_dir, mol.name)
    os.makedirs(d, exist_ok=True)
    stem = os.path.join(d, "minimum")
    if not is_done(stem):
        if _stop_requested(cache_dir, stem):
            return False
        try:
            numbers, start = conformer(mol.smiles, cfg.seed, f"{d} ({mol.smiles})")
        except ValueError as err:
            _reject(stem, err, np.zeros((0, 3)))
            return True
        try:
            out = relax(numbers, start, cfg.level, cfg.fmax, cfg.max_steps)
        except SCFNotConvergedError as err:
            _reject(stem, err, start)
            return True
        save_npz(stem + ".npz", numbers=numbers, start_positions=start, positions=out["positions"],
                 energy=out["energy"], gradient=out["gradient"], fmax=out["fmax"], n_steps=out["n_steps"],
                 n_gradients=out["n_gradients"], wall_total=out["wall"])  # fmt: skip
        log.info("relaxed %s: %d atoms, %d LBFGS steps, max|F| %.1e eV/A, %.1f s",
                 mol.name, len(numbers), out["n_steps"], out["fmax"], out["wall"])  # fmt: skip
    if not os.path.exists(stem + ".npz"):
        return True  # the minimum was rejected: nothing more of this molecule
    minimum = load_npz(stem + ".npz")
    numbers, n = minimum["numbers"], len(minimum["numbers"])
    meta = {"name": mol.name, "family": mol.family, "smiles": mol.smiles, "size_bin": size_bin(n, cfg.size_bins)}
    hstem = os.path.join(d, "minimum_hessian")
    if not is_done(hstem):
        if _stop_requested(cache_dir, hstem):
            return False
        _label(hstem, cfg, "hessian", numbers, minimum["positions"],
               {**meta, "category": "minimum", "split": "minimum", "index": 0}, None)  # fmt: skip
    if not os.path.exists(hstem + ".npz"):
        return True
    samples = _samples(cfg, mol, d, load_npz(hstem + ".npz"))
    for k, positions in enumerate(samples["positions"]):
        kind = label_kind(cfg, n, k, n_test)
        sstem = os.path.join(d, f"nms_{k:03d}")
        if is_done(sstem):
            continue
        if _stop_requested(cache_dir, sstem):
            return False
        rng = np.random.default_rng([cfg.seed, zlib.crc32(mol.name.encode()), k])  # the probes of sample k
        split = "test" if kind == "hessian" else "train"  # train_hessian and pool: training samples
        _label(sstem, cfg, kind, numbers, positions, {**meta, "category": "nms", "split": split, "index": k}, rng)
    return True


def _stop_requested(cache_dir: str, stem: str) -> bool:
    if os.path.exists(os.path.join(cache_dir, "STOP")):
        log.info("STOP file found in %s: stopping before %s", cache_dir, stem)
        return True
    return False


def _samples(cfg: ScaleConfig, mol: ScaleMolecule, d: str, rec: dict[str, Any]) -> dict[str, Any]:
    """The normal-mode samples of a molecule (drawn once from its minimum's Hessian, cached)."""
    path = os.path.join(d, "samples.npz")
    if os.path.exists(path):
        return load_npz(path)
    nm = normal_modes(rec["numbers"], rec["positions"], rec["hessian"])
    stretch = rectilinear_stretch(rec["numbers"], rec["positions"], nm["modes"], nm["omega2"], cfg.temperature)
    frozen = (stretch > cfg.max_rectilinear_stretch) & (nm["freq_cm"] >= cfg.min_freq_cm)
    rng = np.random.default_rng([cfg.seed, zlib.crc32(mol.name.encode())])
    positions, e_harm = sample_normal_modes(rec["positions"], nm["modes"], nm["omega2"], nm["freq_cm"], cfg.n_nms,
                                            cfg.temperature, rng, cfg.min_freq_cm, frozen)  # fmt: skip
    save_npz(path, positions=positions, harmonic_energy=e_harm, freq_cm=nm["freq_cm"], frozen=frozen,
             rectilinear_stretch=stretch)  # fmt: skip
    return load_npz(path)


def _check_cache_config(path: str, cfg: ScaleConfig) -> None:
    """Refuse to resume a cache made with another configuration; record the configuration."""
    if not os.path.exists(path):
        save_json(path, cfg.to_json())
        return
    old = ScaleConfig.from_json(load_json(path))
    if old != cfg:
        diff = [k.name for k in dataclasses.fields(cfg) if getattr(old, k.name) != getattr(cfg, k.name)]
        raise ValueError(f"{path}: the cache was made with another configuration (differs in {diff}); "
                         "use another --cache or the same settings")  # fmt: skip


def run(cfg: ScaleConfig, cache_dir: str, names: list[str] | None = None) -> dict[str, Any]:
    """Generate (or resume) the set in ``cache_dir``, smallest molecules first; returns :func:`summarize`.

    Args:
        cfg: the configuration (must equal the cache's ``config.json`` if there is one).
        cache_dir: the cache directory.
        names: molecules to run (default: all of ``cfg.molecules``).

    Raises:
        ValueError: for an unknown name, or a cache made with another configuration.

    A file ``<cache_dir>/STOP`` stops the run after the calculation in flight. Processes running
    disjoint ``names`` may share a cache (every file belongs to one molecule).
    """
    os.makedirs(cache_dir, exist_ok=True)
    _check_cache_config(os.path.join(cache_dir, "config.json"), cfg)
    by_name = {m.name: m for m in cfg.molecules}
    unknown = sorted(set(names or ()) - set(by_name))
    if unknown:
        raise ValueError(f"unknown molecule names {unknown}; known: {sorted(by_name)}")
    chosen = [by_name[n] for n in names] if names else list(cfg.molecules)
    chosen.sort(key=lambda m: count_atoms(m.smiles))
    n_test = n_test_samples(cfg)
    for mol in chosen:
        if not run_molecule(cfg, mol, cache_dir, n_test[mol.name]):
            break
    return summarize(cache_dir)


def _records(cache_dir: str, pattern: str) -> list[dict[str, Any]]:
    return [load_npz(p) for p in sorted(glob.glob(os.path.join(cache_dir, "*", pattern)))]


def assemble(cache_dir: str, out_dir: str, prefix: str = "xtb_scale") -> dict[str, Any]:
    """Write ``<prefix>-train.h5``, ``-train-<kind>.h5`` per pool kind, ``-test.h5`` and ``-minima.h5``.

    Runs on a partial cache too; returns :func:`summarize` plus the written file names, and
    writes it to ``<cache_dir>/summary.json``.
    """
    os.makedirs(out_dir, exist_ok=True)
    samples = _records(cache_dir, "nms_[0-9][0-9][0-9].npz")
    parts = {
        "train": [r for r in samples if str(r["split"]) == "train"],
        "test": [r for r in samples if str(r["split"]) == "test"],
        "minima": _records(cache_dir, "minimum_hessian.npz"),
    }
    kinds = sorted({k[len("pool_") : -len("_probes")] for r in parts["train"] for k in r if k.endswith("_probes")})
    for kind in kinds:  # one training file per probe family: E, F and that family's pool as the stored probes
        parts[f"train-{kind}"] = [_pool_record(r, kind) for r in parts["train"]]
    written = {}
    for part, recs in parts.items():
        if recs:
            path = os.path.join(out_dir, f"{prefix}-{part}.h5")
            write_h5(path, to_molecules(recs))
            written[part] = os.path.basename(path)
            log.info("assembled %d %s geometries into %s", len(recs), part, path)
    summary = summarize(cache_dir)
    summary["files"] = written
    save_json(os.path.join(cache_dir, "summary.json"), summary)
    # which bins are complete (every molecule's samples labelled or rejected): studies train on those only
    save_json(os.path.join(out_dir, f"{prefix}-bins.json"), {"bins": summary["bins"]})
    return summary


def _pool_record(record: dict[str, Any], kind: str) -> dict[str, Any]:
    """A training record with its ``kind`` pool as the stored probes (``hvp_probes``/``hvps``), without H."""
    where = f"{record.get('name')} nms_{int(record.get('index', -1)):03d}"
    if f"pool_{kind}_probes" not in record:
        raise ValueError(f"{where}: no '{kind}' probe pool (keys {sorted(record)})")
    out = {k: v for k, v in record.items() if k != "hessian" and not k.startswith("pool_")}
    return {**out, "hvp_probes": record[f"pool_{kind}_probes"], "hvps": record[f"pool_{kind}_hvps"]}


def summarize(cache_dir: str) -> dict[str, Any]:
    """Counts per molecule and size bin, rejections, compute time, seconds per gradient (JSON-ready)."""
    cfg_path = os.path.join(cache_dir, "config.json")
    cfg = ScaleConfig.from_json(load_json(cfg_path)) if os.path.exists(cfg_path) else None
    molecules, wall, level = {}, 0.0, None
    for mol in cfg.molecules if cfg else ():
        d = os.path.join(cache_dir, mol.name)
        n = count_atoms(mol.smiles)
        info: dict[str, Any] = {"family": mol.family, "smiles": mol.smiles, "n_atoms": n,
                                "size_bin": size_bin(n, cfg.size_bins), "n_train": 0, "n_test": 0, "n_train_hessian": 0,
                                "rejected": []}  # fmt: skip
        per_gradient = []
        for path in sorted(glob.glob(os.path.join(d, "*.npz"))):
            name = os.path.basename(path)[:-4]
            if name == "samples":
                s = load_npz(path)
                info["lowest_freq_cm"] = float(s["freq_cm"].min())
                info["n_frozen"] = int(s["frozen"].sum())
                continue
            r = load_npz(path)
            wall += float(r["wall_total"])
            if name == "minimum":
                info.update(lbfgs_steps=int(r["n_steps"]), fmax_eV_A=float(r["fmax"]))
                continue
            level = level or json.loads(str(r["level"]))
            per_gradient.append(float(r["wall_total"]) / int(r["n_gradients"]))
            if name.startswith("nms_"):
                info["n_test" if str(r["split"]) == "test" else "n_train"] += 1
                info["n_train_hessian"] += str(r["labels"]) == "train_hessian"
        for path in sorted(glob.glob(os.path.join(d, "*.rejected.json"))):
            stem = os.path.basename(path).removesuffix(".rejected.json")
            info["rejected"].append(f"{stem}: {load_json(path)['reason']}")
            # a rejected minimum (or its Hessian) settles every sample of the molecule: none will be made
            info["n_settled"] = info.get("n_settled", 0) + (cfg.n_nms if stem.startswith("minimum") else 1)
        if per_gradient:
            info["s_per_gradient"] = float(np.median(per_gradient))
        molecules[mol.name] = info
    bins: dict[str, dict[str, Any]] = {}
    for info in molecules.values():
        b = bins.setdefault(info["size_bin"], {"molecules": 0, "train": 0, "test": 0, "train_hessian": 0,
                                               "complete": True})  # fmt: skip
        info["complete"] = info["n_train"] + info["n_test"] + info.get("n_settled", 0) >= cfg.n_nms
        b["complete"] &= info["complete"]
        b["molecules"] += 1
        b["train"] += info["n_train"]
        b["test"] += info["n_test"]
        b["train_hessian"] += info["n_train_hessian"]
    n_geom = sum(i["n_train"] + i["n_test"] for i in molecules.values())
    settled = n_geom + sum(i.get("n_settled", 0) for i in molecules.values())
    return {
        "config": cfg.to_json() if cfg else None,
        "level": level,
        "molecules": molecules,
        "bins": dict(sorted(bins.items(), key=lambda kv: int(kv[0].split("-")[0]))),
        "n_geometries": n_geom,
        "n_planned": len(molecules) * cfg.n_nms if cfg else 0,
        "n_rejected": sum(len(i["rejected"]) for i in molecules.values()),
        "n_settled": settled,  # labelled, rejected, or never to be made (a rejected minimum)
        "compute_s": wall,
    }
