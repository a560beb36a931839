"""Unit conversions and physical constants: the one table of phljax.

phljax works internally in eV and Angstrom: energies eV, forces eV/A, Hessians eV/A^2,
positions A. Readers convert from file units (the ANI-HDF5 convention is Hartree and Angstrom)
once, at the boundary.

There are two sets of constants, and each must stay what it is:

- Reader side (``HARTREE``, ``BOHR``, ``KCAL_MOL``, ``KJ_MOL``): ``ase.units``, whose default is
  CODATA 2014. Every conversion of stored labels to eV and Angstrom uses them (the HDF5 reader and
  writer, ``phljax.datagen.labels.to_molecules``, evaluation, the reaction-set summary), so that
  the training data, and the numbers of every model trained on them, do not move.
- DFT side (``DFT_*``): CODATA 2018, written out. ``phljax.datagen`` has used these since its first
  labels: to turn PySCF's atomic-unit results into Angstrom positions (optimised geometries,
  normal-mode samples), to give ASE, NEB and Sella eV and eV/A, for the dispersion parameters,
  the finite-difference steps and the Boltzmann factor. Changing them would make regenerated
  geometries, and so their labels, differ from the cached ones. (PySCF itself converts its
  Angstrom input with its own ``pyscf.lib.param.BOHR``, 0.52917721092, CODATA 2010; that is
  PySCF's business and is not used here.)

The two differ by less than 1e-8 relative (Hartree 27.211386024 vs 27.211386246 eV), far below
any label's accuracy.

References:
    E. Tiesinga, P. J. Mohr, D. B. Newell, B. N. Taylor, "CODATA recommended values of the
    fundamental physical constants: 2018", Rev. Mod. Phys. 93, 025010 (2021).
    P. J. Mohr, D. B. Newell, B. N. Taylor, "CODATA recommended values of the fundamental physical
    constants: 2014", Rev. Mod. Phys. 88, 035009 (2016) (``ase.units``' default).
"""

from ase import units as _ase

# ----------------------------------------------------------------------------- reader side (CODATA 2014)

HARTREE = float(_ase.Hartree)  # eV per Hartree
BOHR = float(_ase.Bohr)  # Angstrom per Bohr
KCAL_MOL = float(_ase.kcal / _ase.mol)  # eV per kcal/mol
KJ_MOL = float(_ase.kJ / _ase.mol)  # eV per kJ/mol

#: cm^-1 per sqrt(eV/A^2/amu): the harmonic wavenumber of omega^2 = 1 eV/A^2/amu (hbar omega in eV,
#: as ase.vibrations.VibrationsData computes it, over ase.units.invcm, eV per cm^-1); ~521.47
WAVENUMBER = float(_ase._hbar * _ase.m / (_ase._e * _ase._amu) ** 0.5 / _ase.invcm)
INVCM = float(_ase.invcm)  # eV per cm^-1

ENERGY_UNITS = {"ev": 1.0, "hartree": HARTREE, "kcal/mol": KCAL_MOL, "kj/mol": KJ_MOL}
LENGTH_UNITS = {"angstrom": 1.0, "bohr": BOHR}

# ----------------------------------------------------------------------------- DFT side (CODATA 2018)

DFT_BOHR = 0.529177210903  # Angstrom per Bohr (Bohr radius)
DFT_HARTREE = 27.211386245988  # eV per Hartree (Hartree energy in eV)
DFT_HARTREE_KCAL_MOL = 627.5094740631  # kcal/mol per Hartree
DFT_HARTREE_KJ_MOL = 2625.4996394799  # kJ/mol per Hartree
DFT_KB = 3.166811563e-6  # Hartree per Kelvin (Boltzmann constant)


def energy_factor(unit: str) -> float:
    """eV per `unit` (one of 'ev', 'hartree', 'kcal/mol', 'kj/mol'), reader side."""
    try:
        return ENERGY_UNITS[unit.lower()]
    except KeyError:
        raise ValueError(f"unknown energy unit {unit!r}; expected one of {sorted(ENERGY_UNITS)}") from None


def length_factor(unit: str) -> float:
    """Angstrom per `unit` (one of 'angstrom', 'bohr'), reader side."""
    try:
        return LENGTH_UNITS[unit.lower()]
    except KeyError:
        raise ValueError(f"unknown length unit {unit!r}; expected one of {sorted(LENGTH_UNITS)}") from None
