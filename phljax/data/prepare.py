"""Data preparation: loading, deterministic splits, per-element reference energies, scales."""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import resources

import numpy as np

from phljax.data.batching import edges_within
from phljax.data.hdf5 import read_h5
from phljax.data.records import Molecule, formula

__all__ = [
    "DEFAULT_DATA",
    "bundled_path",
    "default_data",
    "load",
    "split",
    "split_indices",
    "dataset_statistics",
    "composition_matrix",
    "fit_atomic_energies",
    "unidentified_formulas",
    "force_rms",
    "mean_neighbors",
    "check_elements",
]


#: The files a run trains on when given none: the bundled reaction set (RTP, IRC, NMS; see
#: phljax/data/bundled/chon_reactions.DATA_CARD.md).
DEFAULT_DATA = ("chon_reactions-RTP.h5", "chon_reactions-IRC.h5", "chon_reactions-NMS.h5")


def bundled_path(name: str) -> str:
    """Path of a data file shipped with phljax (`phljax/data/bundled/`, each set has a data card):
    the reaction set's `chon_reactions-{RTP,IRC,NMS}.h5` or the small NMS set `chon_nms_small.h5`."""
    path = resources.files("phljax.data") / "bundled" / name
    if not path.is_file():
        raise FileNotFoundError(f"bundled data set {name!r} not found at {path}")
    return os.fspath(path)


def default_data() -> list[str]:
    """Paths of :data:`DEFAULT_DATA`, the bundled reaction set (RTP, IRC and NMS files)."""
    return [bundled_path(name) for name in DEFAULT_DATA]


def load(paths: Sequence[str], *, energy_unit: str | None = None, length_unit: str | None = None) -> list[Molecule]:
    """Read and concatenate HDF5 files (eV, Angstrom); `meta['file']` records each record's file."""
    molecules = []
    for path in paths:
        for m in read_h5(path, energy_unit=energy_unit, length_unit=length_unit):
            m.meta["file"] = os.path.basename(path)
            molecules.append(m)
    return molecules


def split(n: int, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> tuple[np.ndarray, ...]:
    """Deterministic random split of range(n) into len(fractions) index arrays (sorted)."""
    fractions = np.asarray(fractions, dtype=float)
    if np.any(fractions < 0) or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fractions.tolist()}")
    order = np.random.default_rng(seed).permutation(n)
    bounds = np.round(np.cumsum(fractions)[:-1] * n).astype(int)
    return tuple(np.sort(part) for part in np.split(order, bounds))


def select_records(molecules: Sequence[Molecule], filters: Sequence[str]) -> list[Molecule]:
    """The records whose ``meta`` matches every ``KEY=VALUE`` filter (values compared as strings).

    Raises:
        ValueError: a filter without '=', or one that no record matches (quoting the values the
            data have for that key).
    """
    out = list(molecules)
    for f in filters:
        key, sep, value = f.partition("=")
        if not sep or not key:
            raise ValueError(f"--select {f!r}: expected KEY=VALUE, e.g. size_bin=10-15")
        have = sorted({str(m.meta[key]) for m in out if key in m.meta})
        out = [m for m in out if str(m.meta.get(key, "")) == value]
        if not out:
            raise ValueError(f"--select {f!r}: no record has {key} = {value!r} (the data have {have or 'no ' + key})")
    return out


def split_indices(
    molecules: Sequence[Molecule],
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    holdout: Sequence[str] = (),
    test_reactions: Sequence[str] = (),
) -> dict[str, np.ndarray]:
    """Train/val/test indices into `molecules` (sorted int arrays).

    Records whose `meta['category']` is in `holdout` (e.g. the paper's irc, nms) or whose
    `meta['reaction']` is in `test_reactions` are never trained or validated on: they all go to
    test. The rest is split at random by `seed` into 1 - val - test, val and test fractions.

    Raises:
        ValueError: a holdout category or test reaction that no record has (quoting what the data
            have), or an empty training split.
    """
    held = np.zeros(len(molecules), bool)
    for key, wanted, flag in (("category", holdout, "--holdout"), ("reaction", test_reactions, "--test-reactions")):
        if not wanted:
            continue
        values = np.array([str(m.meta.get(key, "")) for m in molecules])
        missing = sorted(set(wanted) - set(values.tolist()))
        if missing:
            raise ValueError(f"{flag} {list(wanted)}: no molecule has {key} {missing} "
                             f"(the data have {sorted(set(values.tolist()))})")  # fmt: skip
        held |= np.isin(values, list(wanted))
    pool = np.nonzero(~held)[0]
    fractions = (1 - val_fraction - test_fraction, val_fraction, test_fraction)
    train, val, test = (pool[i] for i in split(len(pool), fractions, seed))
    if len(train) == 0:
        raise ValueError("the training split is empty")
    return {"train": train, "val": val, "test": np.sort(np.concatenate([test, np.nonzero(held)[0]]))}


def dataset_statistics(molecules: Sequence[Molecule], elements: Sequence[int], cutoff: float) -> dict:
    """What the model takes from its training data: `avg_num_neighbors` (within `cutoff` A),
    `atomic_energies` ([len(elements)] eV, least squares) and the energy `scale` (RMS force, eV/A)."""
    return dict(
        avg_num_neighbors=mean_neighbors(molecules, cutoff),
        atomic_energies=fit_atomic_energies(molecules, elements).tolist(),
        scale=force_rms(molecules),
    )


def check_elements(molecules: Sequence[Molecule], elements: Sequence[int]) -> None:
    """Raise a ValueError naming the first record with an element the model does not know."""
    known = set(int(z) for z in elements)
    for i, m in enumerate(molecules):
        bad = set(m.numbers.tolist()) - known
        if bad:
            where = m.meta.get("origin", f"molecule {i}")
            raise ValueError(f"{where}: element(s) {sorted(bad)} not in the model's elements {sorted(known)}")


def composition_matrix(molecules: Sequence[Molecule], elements: Sequence[int]) -> np.ndarray:
    """[len(molecules), len(elements)] atom counts of each element in each molecule."""
    check_elements(molecules, elements)
    index = {int(z): k for k, z in enumerate(elements)}
    counts = np.zeros((len(molecules), len(elements)))
    for i, m in enumerate(molecules):
        for z in m.numbers:
            counts[i, index[int(z)]] += 1
    return counts


def fit_atomic_energies(molecules: Sequence[Molecule], elements: Sequence[int]) -> np.ndarray:
    """Per-element reference energies (eV) by least squares: E ~ sum_i e[Z_i].

    When the compositions do not determine every element's energy (isomers only, or formulas
    that differ by a fixed combination of atoms) this is the minimum-norm solution: total
    energies of compositions outside the span of these (`unidentified_formulas`) are then not
    determined by the data.

    Returns:
        [len(elements)] eV. Elements absent from the data get 0.
    """
    counts = composition_matrix(molecules, elements)
    energies = np.array([m.energy for m in molecules])
    coef, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    return np.where(counts.sum(0) > 0, coef, 0.0)


def unidentified_formulas(train: Sequence[Molecule], others: Sequence[Molecule], elements: Sequence[int]) -> list[str]:
    """Formulas of `others` whose composition is not a linear combination of `train`'s.

    A model's total energy of such a molecule depends on a combination of per-element energies
    the training energies do not fix (e.g. training on isomers of C2H4O and CH2O alone fixes
    O and C + 2H but not C and H apart), so its absolute energy error says nothing about the
    model; energy differences between molecules of one formula are unaffected.

    Returns:
        Sorted distinct Hill formulas.
    """
    if not others:
        return []
    a = composition_matrix(train, elements)
    b = composition_matrix(others, elements)
    if len(train):
        coef, *_ = np.linalg.lstsq(a.T, b.T, rcond=None)  # b_j ~ sum_i coef_ij a_i
        residual = np.abs(a.T @ coef - b.T).max(axis=0)
    else:
        residual = np.abs(b).max(axis=1)
    return sorted({formula(m.numbers) for m, r in zip(others, residual, strict=True) if r > 1e-6})


def force_rms(molecules: Sequence[Molecule]) -> float:
    """Root mean square force component, eV/A (NequIP's energy scale); 1.0 if all forces are zero."""
    f = np.concatenate([m.forces.ravel() for m in molecules])
    rms = float(np.sqrt(np.mean(f**2)))
    return rms if rms > 0 else 1.0


def mean_neighbors(molecules: Sequence[Molecule], cutoff: float) -> float:
    """Average number of neighbours within `cutoff` Angstrom (normalises message sums)."""
    edges = sum(len(edges_within(m.positions, cutoff)[0]) for m in molecules)
    atoms = sum(m.n_atoms for m in molecules)
    return max(edges / atoms, 1.0)
