"""Reader and writer for the ANI-style HDF5 layout of the OpenREACT-CHON-EFH data set.

Layout (pyanitools / TorchANI convention): any group holding a `species` and a `coordinates`
dataset is a set of conformers of one molecule (groups may nest):

    species      [n_atoms] (or [n_conf, n_atoms])  element symbols (bytes/str) or atomic numbers
    coordinates  [n_conf, n_atoms, 3]              length unit (default Angstrom)
    energies     [n_conf]                          energy unit (default Hartree)
    forces       [n_conf, n_atoms, 3]              energy/length          (optional)
    hessian      [n_conf, 3n, 3n] or [n_conf, n, 3, n, 3]  energy/length^2 (optional)
    hvp_probes   [n_conf, K, n_atoms, 3]           dimensionless           (optional)
    hvps         [n_conf, K, n_atoms, 3]           energy/length^2         (optional)
    anything else with leading dimension n_conf (category, reaction, source, ...) -> Molecule.meta

Units are converted once, here, to eV and Angstrom. The file's root attributes `energy_unit` and
`length_unit` are honoured when present; otherwise the ANI convention (Hartree, Angstrom) applies,
and either can be overridden by the caller.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterable, Sequence

import h5py
import numpy as np
from ase.data import chemical_symbols

from phljax import units
from phljax.data.records import Molecule, formula, to_atomic_numbers

__all__ = ["read_h5", "write_h5"]

_LABELS = ("species", "coordinates", "energies", "forces", "hessian", "hessians", "hvp_probes", "hvps")


def read_h5(
    path: str | os.PathLike,
    *,
    energy_unit: str | None = None,
    length_unit: str | None = None,
    require: Sequence[str] = ("energies",),
) -> list[Molecule]:
    """Read every conformer of an ANI-style HDF5 file into `Molecule` records (eV, Angstrom).

    Args:
        path: the HDF5 file.
        energy_unit: unit of energies in the file ('hartree', 'ev', 'kcal/mol', 'kj/mol');
            default: the file's `energy_unit` attribute, else 'hartree'.
        length_unit: unit of lengths in the file ('angstrom', 'bohr'); default: the file's
            `length_unit` attribute, else 'angstrom'.
        require: datasets every conformer group must have besides species and coordinates.

    Returns:
        Records in a deterministic order (groups sorted by path, conformers by index), each with
        `meta['origin'] = 'FILE:/group[index]'`.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: naming the file, dataset and index, for a missing key, a shape mismatch, a
            non-finite value or an unknown element.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such HDF5 file: {path}")
    molecules: list[Molecule] = []
    with h5py.File(path, "r") as f:
        e_unit = energy_unit or _attr(f, "energy_unit", "hartree")
        l_unit = length_unit or _attr(f, "length_unit", "angstrom")
        e, a = units.energy_factor(e_unit), units.length_factor(l_unit)
        groups = _conformer_groups(f)
        if not groups:
            raise ValueError(f"{path}: no group holds both 'species' and 'coordinates'")
        for name in groups:
            molecules.extend(_read_group(path, f[name], e, a, require))
    return molecules


def _attr(f: h5py.File, key: str, default: str) -> str:
    value = f.attrs.get(key, default)
    return value.decode() if isinstance(value, bytes) else str(value)


def _conformer_groups(f: h5py.File) -> list[str]:
    found = []

    def visit(name, obj):
        if isinstance(obj, h5py.Group) and "coordinates" in obj and "species" in obj:
            found.append(name)

    f.visititems(visit)
    return sorted(found)


def _read_group(path: str, g: h5py.Group, e: float, a: float, require: Sequence[str]) -> list[Molecule]:
    where = f"{path}:/{g.name.lstrip('/')}"
    for key in require:
        if key not in g:
            raise ValueError(f"{where}: missing dataset '{key}' (has: {sorted(g.keys())})")
    coords = np.asarray(g["coordinates"][()], dtype=np.float64)
    if coords.ndim == 2:
        coords = coords[None]
    if coords.ndim != 3 or coords.shape[-1] != 3:
        raise ValueError(f"{where}/coordinates: expected [n_conf, n_atoms, 3], got {coords.shape}")
    n_conf, n = coords.shape[:2]

    species = np.asarray(g["species"][()])
    if species.ndim == 1:
        if species.shape[0] != n:
            raise ValueError(f"{where}/species: {species.shape[0]} atoms but coordinates have {n}")
        numbers = [to_atomic_numbers(species, f"{where}/species")] * n_conf
    elif species.shape == (n_conf, n):
        numbers = [to_atomic_numbers(species[i], f"{where}/species[{i}]") for i in range(n_conf)]
    else:
        raise ValueError(f"{where}/species: expected [{n}] or [{n_conf}, {n}], got {species.shape}")

    def load(key, shapes, scale):
        if key not in g:
            return None
        value = np.asarray(g[key][()], dtype=np.float64)
        for shape in shapes:
            if value.shape == shape:
                return value.reshape(shapes[0]) * scale
        raise ValueError(f"{where}/{key}: expected shape {shapes[0]}, got {value.shape}")

    energies = load("energies", [(n_conf,)], e)
    forces = load("forces", [(n_conf, n, 3)], e / a)
    hkey = "hessian" if "hessian" in g else "hessians"
    hessian = load(hkey, [(n_conf, n, 3, n, 3), (n_conf, 3 * n, 3 * n)], e / a**2)
    probes = hvps = None
    if "hvp_probes" in g or "hvps" in g:
        if not ("hvp_probes" in g and "hvps" in g):
            raise ValueError(f"{where}: 'hvp_probes' and 'hvps' must both be present")
        k = g["hvp_probes"].shape[1] if g["hvp_probes"].ndim == 4 else -1
        probes = load("hvp_probes", [(n_conf, k, n, 3)], 1.0)
        hvps = load("hvps", [(n_conf, k, n, 3)], e / a**2)

    meta_keys = [k for k in g.keys() if k not in _LABELS and isinstance(g[k], h5py.Dataset)]
    meta_values = {}
    for k in meta_keys:
        value = g[k][()]
        if np.ndim(value) >= 1 and len(value) == n_conf:
            meta_values[k] = value

    out = []
    for i in range(n_conf):
        origin = f"{where}[{i}]"
        meta = {k: _plain(v[i]) for k, v in meta_values.items()}
        meta["origin"] = origin
        meta.setdefault("group", g.name)
        out.append(
            Molecule(
                numbers=numbers[i],
                positions=coords[i] * a,
                energy=None if energies is None else energies[i],
                forces=None if forces is None else forces[i],
                hessian=None if hessian is None else hessian[i],
                hvp_probes=None if probes is None else probes[i],
                hvps=None if hvps is None else hvps[i],
                meta=meta,
            )
        )
    return out


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def write_h5(
    path: str | os.PathLike,
    molecules: Iterable[Molecule],
    *,
    energy_unit: str = "hartree",
    length_unit: str = "angstrom",
) -> None:
    """Write records in the ANI layout, one group per formula and atom ordering.

    Energies, forces, Hessians ([n_conf, 3n, 3n]) and HVPs are written in `energy_unit` and
    `length_unit` (default: the ANI convention, Hartree and Angstrom), recorded as root attributes.
    A label is written for a group only when every conformer of that group has it. Scalar
    `meta` entries present in every conformer of a group are written as datasets [n_conf].
    """
    e, a = units.energy_factor(energy_unit), units.length_factor(length_unit)
    groups: dict[tuple, list[Molecule]] = collections.defaultdict(list)
    for m in molecules:
        groups[tuple(m.numbers.tolist())].append(m)
    names: dict[str, int] = collections.Counter()
    with h5py.File(os.fspath(path), "w") as f:
        f.attrs["energy_unit"] = energy_unit
        f.attrs["length_unit"] = length_unit
        f.attrs["format"] = "ANI-HDF5 (phljax)"
        for numbers, mols in groups.items():
            base = formula(np.asarray(numbers))
            name = base if names[base] == 0 else f"{base}_{names[base]}"
            names[base] += 1
            g = f.create_group(name)
            g["species"] = np.array([chemical_symbols[z] for z in numbers], dtype="S2")
            g["coordinates"] = np.stack([m.positions for m in mols]) / a
            n = len(numbers)
            if all(m.energy is not None for m in mols):
                g["energies"] = np.array([m.energy for m in mols]) / e
            if all(m.forces is not None for m in mols):
                g["forces"] = np.stack([m.forces for m in mols]) / (e / a)
            if all(m.hessian is not None for m in mols):
                g["hessian"] = np.stack([m.hessian.reshape(3 * n, 3 * n) for m in mols]) / (e / a**2)
            if all(m.hvp_probes is not None for m in mols):
                g["hvp_probes"] = np.stack([m.hvp_probes for m in mols])
                g["hvps"] = np.stack([m.hvps for m in mols]) / (e / a**2)
            keys = set.intersection(*(set(m.meta) for m in mols)) - {"origin", "group"}
            for k in sorted(keys):
                values = [m.meta[k] for m in mols]
                if all(isinstance(v, str) for v in values):
                    g[k] = np.array([v.encode() for v in values])
                elif all(isinstance(v, (int, float, np.integer, np.floating)) for v in values):
                    g[k] = np.array(values)
