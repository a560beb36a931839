"""Unit conversions. phljax works internally in eV and Angstrom.

Energies eV, forces eV/A, Hessians eV/A^2, positions A. Readers convert from file units
(the ANI-HDF5 convention is Hartree and Angstrom) once, at the boundary.
"""

from ase import units as _ase

HARTREE = float(_ase.Hartree)  # eV per Hartree
BOHR = float(_ase.Bohr)  # Angstrom per Bohr
KCAL_MOL = float(_ase.kcal / _ase.mol)  # eV per kcal/mol
KJ_MOL = float(_ase.kJ / _ase.mol)  # eV per kJ/mol

ENERGY_UNITS = {"ev": 1.0, "hartree": HARTREE, "kcal/mol": KCAL_MOL, "kj/mol": KJ_MOL}
LENGTH_UNITS = {"angstrom": 1.0, "bohr": BOHR}


def energy_factor(unit: str) -> float:
    """eV per `unit` (one of 'ev', 'hartree', 'kcal/mol', 'kj/mol')."""
    try:
        return ENERGY_UNITS[unit.lower()]
    except KeyError:
        raise ValueError(f"unknown energy unit {unit!r}; expected one of {sorted(ENERGY_UNITS)}") from None


def length_factor(unit: str) -> float:
    """Angstrom per `unit` (one of 'angstrom', 'bohr')."""
    try:
        return LENGTH_UNITS[unit.lower()]
    except KeyError:
        raise ValueError(f"unknown length unit {unit!r}; expected one of {sorted(LENGTH_UNITS)}") from None
