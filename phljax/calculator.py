"""An ASE calculator on a trained phljax model: energy, forces and the analytic Hessian of a molecule.

    >>> from phljax.calculator import PHLCalculator
    >>> atoms.calc = PHLCalculator.from_workdir("results/study/random/efh-s0")
    >>> e, f = atoms.get_potential_energy(), atoms.get_forces()   # eV, [N, 3] eV/A
    >>> h = atoms.calc.get_hessian(atoms)                          # [3N, 3N] eV/A^2

ASE (3.29) has no standard Hessian property: this calculator lists "hessian" in
`implemented_properties` (as fairchem, HIP and apax do), so `calc.get_property("hessian", atoms)`
and `calc.get_hessian(atoms)` both work and cache it like energy and forces. The [3N, 3N] layout is
what Sella's `hessian_function` (`Sella(atoms, order=1, hessian_function=calc.get_hessian)`) and
`ase.vibrations.VibrationsData.from_2d(atoms, hessian)` take. The Hessian comes from chunked HVPs of
the model (`Potential.hessian`), not from finite differences.

Molecules only: periodic cells are refused, as are elements the model was not trained on and
non-finite positions (`ValueError`). Everything is evaluated in float64 by default (the parameters
are cast once): finite differences of a float32 energy lose about half their digits, and Sella,
geometry optimisers and `ase.vibrations` all difference energies or forces. `dtype=np.float32`
evaluates in single precision (faster, for molecular dynamics), except the Hessian, which is always
float64 (eigenvalues, frequencies).

Units: energies eV, forces eV/A, Hessians eV/A^2, positions Angstrom.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from phljax.potential import Potential

__all__ = ["PHLCalculator"]


class PHLCalculator(Calculator):
    """ASE calculator of a `phljax.Potential`: energy, free_energy, forces and hessian.

    Args:
        potential: the trained model (`Potential.from_workdir(path)`; or use `from_workdir`).
        dtype: np.float64 (default) or np.float32: the precision of energies and forces. The
            Hessian is always computed in float64.
        hessian_chunk: HVP columns computed at a time for the Hessian (memory against speed;
            None: all 3N at once). See `Potential.hessian`.

    Attributes:
        potential: the `Potential`; `potential.compilations` counts its traces.
        counts: {"energy_forces": calls, "hessian": calls} of the model since construction.

    Raises (from `calculate`):
        ValueError: a periodic cell (any `atoms.pbc`), an element the model lacks, non-finite
            positions.
    """

    implemented_properties = ["energy", "free_energy", "forces", "hessian"]

    def __init__(self, potential: Potential, *, dtype=np.float64, hessian_chunk: int | None = 16, **kwargs):
        super().__init__(**kwargs)
        dtype = np.dtype(dtype)
        if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        self.potential = potential
        self.dtype = dtype
        self.hessian_chunk = hessian_chunk
        self.counts = {"energy_forces": 0, "hessian": 0}

    @classmethod
    def from_workdir(cls, workdir: str, **kwargs) -> PHLCalculator:
        """The calculator of the best checkpoint of the training run in `workdir` (kwargs as `__init__`)."""
        return cls(Potential.from_workdir(workdir), **kwargs)

    def _check(self, atoms: Atoms) -> tuple[np.ndarray, np.ndarray]:
        """(numbers [N], positions [N, 3] A) of a molecule the model can evaluate, else ValueError."""
        if np.any(atoms.pbc):
            raise ValueError(
                f"PHLCalculator handles molecules only; got pbc={atoms.pbc.tolist()} "
                f"(set atoms.pbc = False for a molecule in a box)"
            )
        numbers = np.asarray(atoms.numbers)
        unknown = sorted(set(numbers.tolist()) - set(self.potential.elements))
        if unknown:
            raise ValueError(
                f"element(s) {unknown} of {atoms.get_chemical_formula()} not in the model's elements "
                f"{sorted(self.potential.elements)}"
            )
        positions = np.asarray(atoms.positions, dtype=np.float64)  # [N, 3] A
        if not np.all(np.isfinite(positions)):
            bad = np.flatnonzero(~np.isfinite(positions).all(axis=1)).tolist()
            raise ValueError(f"positions of atom(s) {bad} are not finite: {positions[bad].tolist()}")
        return numbers, positions

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        """Fill `results`: energy and free_energy (eV), forces ([N, 3] eV/A), and hessian
        ([3N, 3N] eV/A^2) when asked for. Energy and forces of an unchanged geometry are kept."""
        keep = {} if system_changes else {k: v for k, v in self.results.items() if k != "hessian"}
        super().calculate(atoms, properties, system_changes)
        if self.atoms is None:
            raise ValueError("PHLCalculator has no atoms: pass them (calc.get_hessian(atoms)) or attach it to atoms")
        numbers, positions = self._check(self.atoms)
        self.results = keep
        if "energy" not in keep:
            energy, forces = self.potential.energy_and_forces(numbers, positions, dtype=self.dtype)
            self.counts["energy_forces"] += 1
            self.results.update(energy=float(energy), free_energy=float(energy), forces=np.asarray(forces, np.float64))
        if "hessian" in properties:
            hessian = self.potential.hessian(numbers, positions, dtype=np.float64, chunk_size=self.hessian_chunk)
            self.counts["hessian"] += 1
            self.results["hessian"] = np.asarray(hessian, np.float64)  # [3N, 3N] eV/A^2, symmetric

    def get_hessian(self, atoms: Atoms | None = None) -> np.ndarray:
        """The model's Hessian d2E/dR dR of `atoms` (default: the last atoms), [3N, 3N] eV/A^2, float64.

        Row and column 3 i + a are atom i, Cartesian component a: the layout of Sella's
        `hessian_function` and of `VibrationsData.from_2d`. Same as `get_property("hessian", atoms)`.
        """
        return self.get_property("hessian", atoms)
