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
from phljax.data.records import COINCIDENT_TOL, Molecule, coincident_atoms, formula, to_atomic_numbers

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

    The reader either returns every conformation of every conformer group, or raises: it never
    skips a record. What it accepts and refuses:

    - A conformer group is any group (the root included) holding one of the label datasets
      (`species`, `coordinates`, `energies`, `forces`, `hessian`, `hvp_probes`, `hvps`); it must hold
      `species`, `coordinates` and every dataset of `require`, and at least one conformation of at
      least one atom. Groups holding none of them (containers of nested groups, empty groups) are
      not conformer groups and are passed over.
    - Label datasets must hold numbers (integer or floating point); strings, booleans, complex
      numbers and compound types are refused rather than converted. `species` holds element
      symbols (case-insensitive) or atomic numbers 1..118.
    - Any other dataset of a conformer group whose leading dimension is n_conf is per-conformer
      provenance and goes to `Molecule.meta` (e.g. `category`, `reaction`, `point`, `source`);
      other datasets and subgroups are left alone, as are dangling links.
    - Non-finite values, and two atoms of a conformation at the same position (closer than
      `records.COINCIDENT_TOL`), are refused, naming the group and the conformation.

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
        ValueError: naming the file, and for a problem of one group its path, the dataset and the
            conformation index: a file that is not HDF5 (truncated, corrupt), an unknown unit, a
            missing dataset, a shape or dtype mismatch, a non-finite value, an unknown element,
            coincident atoms, a group without conformations or atoms.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such HDF5 file: {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path}: cannot open as HDF5 (truncated, corrupt or not HDF5): {err}") from err
    molecules: list[Molecule] = []
    with f:
        e = _unit(path, f, "energy_unit", energy_unit, "hartree", units.energy_factor)
        a = _unit(path, f, "length_unit", length_unit, "angstrom", units.length_factor)
        groups = _conformer_groups(path, f)
        if not groups:
            raise ValueError(f"{path}: no group holds both 'species' and 'coordinates'")
        for name in groups:
            molecules.extend(_read_group(path, f[name] if name else f, e, a, require))
    return molecules


def _unit(path: str, f: h5py.File, key: str, given: str | None, default: str, factor) -> float:
    """The factor of the caller's unit, else of the file's root attribute `key`, else of `default`."""
    if given:
        source, unit = "", given
    else:
        source = f" (root attribute {key!r})"
        try:
            value = f.attrs.get(key, default)
        except (OSError, KeyError, RuntimeError, TypeError) as err:
            raise ValueError(f"{path}: cannot read root attribute {key!r}: {err}") from err
        unit = value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)
    try:
        return factor(unit)
    except ValueError as err:
        raise ValueError(f"{path}{source}: {err}") from None


def _conformer_groups(path: str, f: h5py.File) -> list[str]:
    """Paths of the groups holding a label dataset, sorted ('' is the root)."""
    found = []

    def visit(name, obj):
        if isinstance(obj, h5py.Group) and any(k in obj for k in _LABELS):
            found.append(name)

    try:
        visit("", f)
        f.visititems(visit)
    except (OSError, KeyError, RuntimeError) as err:
        raise ValueError(f"{path}: cannot list the file's groups (corrupt?): {err}") from err
    return sorted(found)


def _get(where: str, g: h5py.Group, key: str):
    """`g[key]`, or None for a dangling soft or external link."""
    try:
        return g[key]
    except (KeyError, OSError, RuntimeError, ValueError) as err:
        try:
            link = g.get(key, getlink=True)
        except (KeyError, OSError, RuntimeError, ValueError):
            link = None
        if isinstance(link, (h5py.SoftLink, h5py.ExternalLink)):
            return None
        raise ValueError(f"{where}/{key}: cannot open: {err}") from err


def _dataset(where: str, g: h5py.Group, key: str) -> np.ndarray:
    """The whole of dataset `key` as an array; ValueError naming it if it is none or unreadable."""
    obj = _get(where, g, key)
    if not isinstance(obj, h5py.Dataset):
        kind = "a dangling link" if obj is None else f"a {type(obj).__name__.lower()}"
        raise ValueError(f"{where}/{key}: expected a dataset, got {kind}")
    try:
        value = obj[()]
    except (OSError, KeyError, RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"{where}/{key}: cannot read: {err}") from err
    if isinstance(value, h5py.Empty):
        raise ValueError(f"{where}/{key}: the dataset has no data (null dataspace)")
    return np.asarray(value)


def _numbers(where: str, g: h5py.Group, key: str) -> np.ndarray:
    """Dataset `key` as float64; ValueError unless it holds integers or floating-point numbers."""
    value = _dataset(where, g, key)
    if value.dtype.kind not in "iuf":
        raise ValueError(f"{where}/{key}: expected numbers, got dtype {value.dtype}")
    return value.astype(np.float64)


def _read_group(path: str, g: h5py.Group, e: float, a: float, require: Sequence[str]) -> list[Molecule]:
    where = f"{path}:/{g.name.lstrip('/')}"
    for key in ("species", "coordinates", *require):
        if key not in g:
            raise ValueError(f"{where}: missing dataset '{key}' (has: {sorted(g.keys())})")
    coords = _numbers(where, g, "coordinates")
    if coords.ndim == 2:
        coords = coords[None]
    if coords.ndim != 3 or coords.shape[-1] != 3:
        raise ValueError(f"{where}/coordinates: expected [n_conf, n_atoms, 3], got {coords.shape}")
    n_conf, n = coords.shape[:2]
    if n_conf == 0 or n == 0:
        raise ValueError(
            f"{where}/coordinates: no {'conformations' if n_conf == 0 else 'atoms'} (shape {coords.shape})"
        )

    species = _dataset(where, g, "species")
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
        value = _numbers(where, g, key)
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
        probes = _numbers(where, g, "hvp_probes")
        if probes.ndim != 4 or probes.shape[0] != n_conf or probes.shape[2:] != (n, 3):
            raise ValueError(f"{where}/hvp_probes: expected shape ({n_conf}, K, {n}, 3), got {probes.shape}")
        hvps = load("hvps", [probes.shape], e / a**2)

    meta_values = {}
    for k in g.keys():
        if k in _LABELS:
            continue
        obj = _get(where, g, k)
        if isinstance(obj, h5py.Dataset) and obj.shape and obj.shape[0] == n_conf:
            meta_values[k] = _dataset(where, g, k)

    positions = coords * a
    pairs = coincident_atoms(positions)
    out = []
    for i in range(n_conf):
        origin = f"{where}[{i}]"
        meta = {k: _plain(v[i], f"{where}/{k}[{i}]") for k, v in meta_values.items()}
        meta["origin"] = origin
        meta.setdefault("group", g.name)
        out.append(
            Molecule(
                numbers=numbers[i],
                positions=positions[i],
                energy=None if energies is None else energies[i],
                forces=None if forces is None else forces[i],
                hessian=None if hessian is None else hessian[i],
                hvp_probes=None if probes is None else probes[i],
                hvps=None if hvps is None else hvps[i],
                meta=meta,
            )
        )
        if pairs[i, 0] >= 0:
            p, q = pairs[i]
            raise ValueError(
                f"{origin}: atoms {p} and {q} ({chemical_symbols[numbers[i][p]]}, {chemical_symbols[numbers[i][q]]}) "
                f"coincide at {positions[i, p].tolist()} (closer than {COINCIDENT_TOL} A)"
            )
    return out


def _plain(value, where: str):
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError as err:
            raise ValueError(f"{where}: not UTF-8 text: {value!r}") from err
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
