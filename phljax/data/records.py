"""Molecule records: one labelled geometry, host-side numpy, internal units (eV, Angstrom).

A record is what every reader produces and every batcher consumes. Labels that a data set does
not have are `None`; a record may carry a full Hessian, or only probe vectors with their reference
Hessian-vector products (the Hessian-free labels PHL is made for), or neither.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from ase.data import atomic_numbers, chemical_symbols
from ase.formula import Formula

__all__ = ["Molecule", "to_atomic_numbers", "formula", "coincident_atoms", "COINCIDENT_TOL"]

#: Two atoms closer than this (Angstrom) are at the same position: a corrupt geometry, not a short
#: bond (the shortest, H2's, is 0.74 A; the float precision of coordinates is ~1e-15 A). Readers of
#: files refuse it (`phljax.data.read_h5`); a `Molecule` built in memory may hold it, since the
#: model's derivatives are finite there by design (tests/test_safety.py builds such records).
COINCIDENT_TOL = 1e-4


@dataclasses.dataclass(frozen=True)
class Molecule:
    """One labelled geometry.

    Attributes:
        numbers: atomic numbers, int [n_atoms].
        positions: Cartesian positions, [n_atoms, 3] Angstrom.
        energy: total energy, eV (None if unlabelled).
        forces: forces = -dE/dR, [n_atoms, 3] eV/Angstrom.
        hessian: d2E/dR dR, [n_atoms, 3, n_atoms, 3] eV/Angstrom^2.
        hvp_probes: probe vectors v, [n_probes, n_atoms, 3] (dimensionless).
        hvps: reference products H v, [n_probes, n_atoms, 3] eV/Angstrom^2.
        meta: free-form provenance (name, category, reaction id, source file/key/index).
    """

    numbers: np.ndarray
    positions: np.ndarray
    energy: float | None = None
    forces: np.ndarray | None = None
    hessian: np.ndarray | None = None
    hvp_probes: np.ndarray | None = None
    hvps: np.ndarray | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        where = self.meta.get("origin", "molecule")
        numbers = np.asarray(self.numbers)
        if numbers.ndim != 1 or not np.issubdtype(numbers.dtype, np.integer):
            raise ValueError(f"{where}: numbers must be an int array [n_atoms], got {numbers.dtype} {numbers.shape}")
        n = numbers.shape[0]
        if n == 0:
            raise ValueError(f"{where}: a molecule needs at least one atom")
        bad = (numbers < 1) | (numbers >= len(chemical_symbols))
        if np.any(bad):
            raise ValueError(f"{where}: unknown atomic number(s) {sorted(set(numbers[bad].tolist()))}")
        object.__setattr__(self, "numbers", numbers.astype(np.int32))
        shapes = {
            "positions": (n, 3),
            "forces": (n, 3),
            "hessian": (n, 3, n, 3),
        }
        for name, shape in shapes.items():
            value = getattr(self, name)
            if value is None:
                continue
            value = np.asarray(value, dtype=np.float64)
            if name == "hessian" and value.shape == (3 * n, 3 * n):
                value = value.reshape(n, 3, n, 3)
            if value.shape != shape:
                raise ValueError(f"{where}: {name} has shape {value.shape}, expected {shape} for {n} atoms")
            _check_finite(value, name, where)
            object.__setattr__(self, name, value)
        if self.energy is not None:
            energy = float(self.energy)
            _check_finite(np.asarray(energy), "energy", where)
            object.__setattr__(self, "energy", energy)
        if (self.hvp_probes is None) != (self.hvps is None):
            raise ValueError(f"{where}: hvp_probes and hvps come together")
        if self.hvp_probes is not None:
            probes = np.asarray(self.hvp_probes, dtype=np.float64)
            hvps = np.asarray(self.hvps, dtype=np.float64)
            if probes.ndim != 3 or probes.shape[1:] != (n, 3) or hvps.shape != probes.shape:
                raise ValueError(
                    f"{where}: hvp_probes {probes.shape} and hvps {hvps.shape} must both be [n_probes, {n}, 3]"
                )
            _check_finite(probes, "hvp_probes", where)
            _check_finite(hvps, "hvps", where)
            object.__setattr__(self, "hvp_probes", probes)
            object.__setattr__(self, "hvps", hvps)

    @property
    def n_atoms(self) -> int:
        return int(self.numbers.shape[0])

    @property
    def num_probes(self) -> int:
        return 0 if self.hvp_probes is None else int(self.hvp_probes.shape[0])


def _check_finite(value: np.ndarray, name: str, where: str) -> None:
    bad = ~np.isfinite(value)
    if np.any(bad):
        index = tuple(int(i) for i in np.argwhere(bad)[0]) if value.ndim else ()
        raise ValueError(f"{where}: {name} has a non-finite value at index {index}")


def to_atomic_numbers(species, where: str = "species") -> np.ndarray:
    """Element symbols (str or bytes) or atomic numbers -> int32 atomic numbers [n_atoms].

    Raises:
        ValueError: naming `where` and the index of an unknown element.
    """
    species = np.asarray(species)
    if np.issubdtype(species.dtype, np.integer):
        bad = (species < 1) | (species >= len(chemical_symbols))  # before the cast: 2**32 + 6 is no carbon
        if np.any(bad):
            i = int(np.argmax(bad))
            raise ValueError(f"{where}: unknown atomic number {int(species[i])} at index {i}")
        return species.astype(np.int32)
    out = np.empty(species.shape, np.int32)
    for i, s in enumerate(species.tolist()):
        symbol = s.decode("utf-8", "backslashreplace") if isinstance(s, bytes) else str(s)
        symbol = symbol.strip()
        symbol = symbol[:1].upper() + symbol[1:].lower()
        if symbol not in atomic_numbers or symbol == "X":
            raise ValueError(f"{where}: unknown element {symbol!r} at index {i}")
        out[i] = atomic_numbers[symbol]
    return out


def coincident_atoms(positions: np.ndarray, tol: float = COINCIDENT_TOL) -> np.ndarray:
    """The first pair of atoms closer than `tol` Angstrom of each geometry, -1 where there is none.

    Args:
        positions: [..., n_atoms, 3] Angstrom.
        tol: distance below which two atoms coincide.

    Returns:
        int [..., 2]: the pair (i, j), i < j, first in row-major order; (-1, -1) for a geometry without
        one. Non-finite positions are never a pair (the record's own check names them).
    """
    positions = np.asarray(positions, dtype=np.float64)
    lead, n = positions.shape[:-2], positions.shape[-2]
    flat = positions.reshape(-1, n, 3)
    out = np.full((flat.shape[0], 2), -1, dtype=np.int64)
    upper = np.triu(np.ones((n, n), dtype=bool), k=1)
    chunk = max(1, 2**22 // max(1, n * n))  # bounds the [chunk, n, n] distance array
    for start in range(0, flat.shape[0], chunk):
        p = flat[start : start + chunk]
        with np.errstate(invalid="ignore"):  # inf - inf
            close = (np.linalg.norm(p[:, :, None] - p[:, None, :], axis=-1) < tol) & upper
        for c in np.flatnonzero(close.any(axis=(1, 2))):
            out[start + c] = np.argwhere(close[c])[0]
    return out.reshape(*lead, 2)


def formula(numbers: np.ndarray) -> str:
    """Hill formula, e.g. [6, 1, 1, 8] -> 'CH2O'."""
    return Formula.from_list([chemical_symbols[z] for z in numbers]).format("hill")
