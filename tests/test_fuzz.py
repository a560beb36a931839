"""Fuzzing the readers: `phljax.data.read_h5` (ANI-layout HDF5) and the reaction xyz reader.

Outcome contract, checked for every generated case:

- HDF5: `read_h5` either returns records, and then every conformation of every conformer group
  written is there, in order (groups sorted by path, conformations by index), with the values
  written (after unit conversion) and the per-conformer provenance; or it raises `ValueError`
  whose message names the file and, for a problem of one group, the group, the dataset (or
  quantity) and, for a problem of one conformation, its index. A case built valid must read; a
  case with a defect must raise; any other exception fails the test.
- xyz: `read_reaction` either returns a reaction whose frames are exactly the file's frames (each
  non-blank line consumed, atoms and positions as written), or raises `ReactionFileError` (a
  `ValueError`) naming the file and a line or frame.

Each case must finish within `DEADLINE_MS` (hypothesis' deadline); a case that hangs in C code is
ended by a faulthandler watchdog after `HANG_S` seconds, which dumps the stacks and stops pytest.

Cases per CI run: `MAX_EXAMPLES` = 250 per fuzz test, 2 fuzz tests: 500 generated cases, plus the
explicit regression cases below. The CI profile is derandomized (the same cases every run, no
example database written); `PHLJAX_FUZZ_PROFILE=phljax-fuzz-long` runs 20x as many random cases.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import faulthandler
import glob
import math
import os
import re
import sys
import tempfile

import h5py
import numpy as np
import pytest
from ase.data import atomic_numbers, chemical_symbols
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from phljax import units
from phljax.data import read_h5
from phljax.datagen.reactions.spec import ReactionFileError, read_reaction

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REACTION_FILES = sorted(glob.glob(os.path.join(ROOT, "data", "reactions", "*.xyz")))

MAX_EXAMPLES = 250  # per fuzz test in CI
DEADLINE_MS = 2000  # per case; a case takes ~10 ms
HANG_S = 60  # per case: the watchdog's limit

settings.register_profile(
    "phljax-fuzz-ci",
    max_examples=MAX_EXAMPLES,
    deadline=DEADLINE_MS,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "phljax-fuzz-long",
    parent=settings.get_profile("phljax-fuzz-ci"),
    max_examples=20 * MAX_EXAMPLES,
    derandomize=False,
)
FUZZ = settings.get_profile(os.environ.get("PHLJAX_FUZZ_PROFILE", "phljax-fuzz-ci"))  # not loaded globally


@contextlib.contextmanager
def _watchdog():
    """Dump every thread's stack and exit if the block runs HANG_S seconds (also in C code)."""
    faulthandler.dump_traceback_later(HANG_S, exit=True, file=sys.__stderr__)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


# ============================================================================ HDF5 cases

ELEMENTS = (1, 6, 7, 8)
LABEL_KEYS = ("species", "coordinates", "energies", "forces", "hessian", "hessians", "hvp_probes", "hvps")
FLOAT_LABELS = ("coordinates", "energies", "forces", "hessian", "hessians", "hvp_probes", "hvps")
QUANTITY = {  # dataset -> the words a message may name it by (Molecule's field names)
    "coordinates": ("coordinates", "positions"),
    "energies": ("energies", "energy"),
    "hessians": ("hessians", "hessian"),
}


@dataclasses.dataclass
class Group:
    """One conformer group as written: `data` maps a key to an array, or to a marker tuple
    ('group',) a subgroup, ('empty', dtype) a null-dataspace dataset, ('link', target) a soft link."""

    name: str  # path in the file, '' for the root
    n_conf: int
    n: int
    data: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class H5Case:
    groups: list
    attrs: dict
    override: dict
    others: list  # (path, kind) of groups that hold no conformers
    file_op: tuple | None = None  # ('truncate', k) | ('replace', bytes) | ('prepend', bytes)
    defects: list = dataclasses.field(default_factory=list)  # (group or None, words, index or None)
    kinds: list = dataclasses.field(default_factory=list)  # what was done (for the statistics)


def _formula(numbers) -> str:
    counts = collections.Counter(chemical_symbols[z] for z in numbers)
    return "".join(f"{s}{counts[s] if counts[s] > 1 else ''}" for s in sorted(counts))


@st.composite
def h5_cases(draw) -> H5Case:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    groups: list[Group] = []
    for _ in range(draw(st.integers(1, 3))):
        n, n_conf = draw(st.integers(1, 4)), draw(st.integers(1, 3))
        numbers = rng.choice(ELEMENTS, n)
        prefix = draw(st.sampled_from(["", "", "a/", "a/b/", "reactions/r0001/", "nest", "root"]))
        if prefix == "nest":  # a conformer group inside another
            prefix = f"{groups[-1].name}/" if groups and groups[-1].name else ""
        name = "" if prefix == "root" else f"{prefix}{_formula(numbers)}"
        if prefix == "root" and any(g.name == "" for g in groups):
            name = _formula(numbers)
        while any(g.name == name for g in groups):
            name += "_1"
        g = Group(name, n_conf, n)
        _fill(draw, rng, g, numbers)
        groups.append(g)
    case = H5Case(groups, attrs={}, override={}, others=[])
    for key, choices in (
        ("energy_unit", [None, "hartree", "ev", "kcal/mol", "kj/mol", "Hartree", b"ev"]),
        ("length_unit", [None, "angstrom", "bohr", "Bohr"]),
    ):
        value = draw(st.sampled_from(choices))
        if value is not None:
            case.attrs[key] = value
        if draw(st.integers(0, 4)) == 0:
            case.override[key] = draw(st.sampled_from(choices[1:4]))
    for path in draw(st.lists(st.sampled_from(["empty", "a/empty", "notes"]), max_size=2, unique=True)):
        case.others.append((path, "empty" if "empty" in path else "notes"))

    n_defects = draw(st.sampled_from([0, 0, 1, 1, 1, 2]))
    targets = draw(st.permutations(range(len(groups))))[:n_defects]
    for t in targets:
        kind = draw(st.sampled_from(GROUP_DEFECTS))
        defect = _defect(draw, rng, groups[t], kind)
        if defect is not None:
            case.defects.append(defect)
            case.kinds.append(kind)
    file_defect = draw(st.sampled_from(FILE_DEFECTS)) if draw(st.integers(0, 2)) == 0 else None
    if file_defect == "truncate":
        case.file_op = ("truncate", draw(st.integers(1, 4096)))
    elif file_defect == "replace":
        case.file_op = ("replace", draw(st.binary(max_size=600)))
    elif file_defect == "prepend":
        case.file_op = ("prepend", draw(st.binary(min_size=1, max_size=511)))  # not at 512: a user block
    elif file_defect == "unit":
        key = draw(st.sampled_from(["energy_unit", "length_unit"]))
        case.attrs[key] = draw(st.sampled_from(["rydberg", 5, "", b"\xff"]))
        if key in case.override and draw(st.booleans()):
            pass  # the caller's unit wins: the bad attribute is never read
        else:
            case.override.pop(key, None)
            case.defects.append((None, (key,), None))
    elif file_defect == "no groups":
        case.groups = []
        case.others.append(("lonely", "notes"))
        case.defects = [(None, ("no group",), None)]
    if file_defect in ("truncate", "replace", "prepend"):
        case.defects.append((None, ("HDF5",), None))
    if file_defect:
        case.kinds.append(file_defect)
    return case


def _fill(draw, rng, g: Group, numbers):
    """A valid group: well separated atoms (>= 0.7 A), labels in random dtypes and layouts."""
    n, n_conf = g.n, g.n_conf
    d = g.data
    encoding = draw(st.sampled_from(["S", "S", "vlen", "lower", "padded", "int64", "int32", "uint8", "per_conf"]))
    if encoding == "per_conf":
        per_conf = rng.choice(ELEMENTS, (n_conf, n))
        d["species"] = np.array([[chemical_symbols[z].encode() for z in row] for row in per_conf], dtype="S2")
    else:
        symbols = [chemical_symbols[z] for z in numbers]
        d["species"] = {
            "S": lambda: np.array([s.encode() for s in symbols], dtype="S2"),
            "vlen": lambda: np.array(symbols, dtype=h5py.string_dtype()),
            "lower": lambda: np.array([s.lower().encode() for s in symbols], dtype="S2"),
            "padded": lambda: np.array([f" {s} ".encode() for s in symbols], dtype="S4"),
            "int64": lambda: np.asarray(numbers, dtype=np.int64),
            "int32": lambda: np.asarray(numbers, dtype=np.int32),
            "uint8": lambda: np.asarray(numbers, dtype=np.uint8),
        }[encoding]()
    ctype = draw(st.sampled_from(["f8", "f8", "f4", "f2", ">f8", "int"]))
    if ctype == "int":  # integers 2 apart in x
        coords = np.arange(n)[:, None] * np.array([2, 0, 0]) + rng.integers(-3, 4, (n_conf, n, 3)) * [0, 1, 1]
    else:
        coords = np.arange(n)[:, None] * np.array([1.3, 0.0, 0.0]) + rng.uniform(-0.3, 0.3, (n_conf, n, 3))
        coords = coords.astype(ctype)
    if n_conf == 1 and draw(st.integers(0, 5)) == 0:
        coords = coords[0]  # [n_atoms, 3]: one conformation
    d["coordinates"] = coords
    d["energies"] = (rng.normal(-100, 10, n_conf)).astype(draw(st.sampled_from(["f8", "f4", "int64"])))
    if draw(st.integers(0, 9)) < 7:
        d["forces"] = rng.normal(size=(n_conf, n, 3)).astype(draw(st.sampled_from(["f8", "f4"])))
    if draw(st.booleans()):
        h = rng.normal(size=(n_conf, 3 * n, 3 * n))
        if draw(st.booleans()):
            h = h.reshape(n_conf, n, 3, n, 3)
        d[draw(st.sampled_from(["hessian", "hessian", "hessians"]))] = h
    if draw(st.integers(0, 9)) < 3:
        k = draw(st.integers(1, 2))
        d["hvp_probes"] = rng.normal(size=(n_conf, k, n, 3))
        d["hvps"] = rng.normal(size=(n_conf, k, n, 3))
    for key in draw(st.lists(st.sampled_from(EXTRA_KEYS), max_size=4, unique=True)):
        d[key] = EXTRAS[key](rng, n_conf)


EXTRAS = {  # valid extra keys: per-conformer provenance (-> meta) or anything else (left alone)
    "category": lambda rng, m: np.array([b"nms", b"ts", b"irc"] * m)[:m],
    "point": lambda rng, m: np.array([f"p{i}" for i in range(m)], dtype=h5py.string_dtype()),
    "index": lambda rng, m: np.arange(m, dtype=np.int64),
    "sum_rule_rel": lambda rng, m: np.where(np.arange(m) == 0, np.nan, rng.uniform(size=m)),  # meta may be NaN
    "iform": lambda rng, m: rng.integers(0, 5, (m, 2)),
    "smiles": lambda rng, m: np.bytes_(b"C=O"),
    "atoms_extra": lambda rng, m: np.zeros(m + 1),
    "nothing": lambda rng, m: ("empty", "f8"),
    "sub": lambda rng, m: ("group",),
    "dangling": lambda rng, m: ("link", "/nowhere"),
}
EXTRA_KEYS = tuple(EXTRAS)

FILE_DEFECTS = ("truncate", "replace", "prepend", "unit", "no groups")
GROUP_DEFECTS = (
    "drop",
    "shape",
    "dtype",
    "nonfinite",
    "species",
    "coincident",
    "zero conformations",
    "zero atoms",
    "not a dataset",
    "meta text",
)


def _labels(g: Group):
    return [k for k in LABEL_KEYS if k in g.data]


def _conf_axis_index(g: Group, key: str, flat: int) -> int:
    """The conformation of element `flat` of dataset `key` (a 2-D `coordinates` is conformation 0)."""
    shape = np.shape(g.data[key])
    if key == "coordinates" and len(shape) == 2:
        return 0
    return int(np.unravel_index(flat, shape)[0])


def _defect(draw, rng, g: Group, kind: str):
    """Make group `g` invalid in one way; the (group, words, index) its error must name."""
    d = g.data
    if kind == "drop":
        choices = ["species", "coordinates", "energies"] + [k for k in ("hvp_probes", "hvps") if k in d]
        key = draw(st.sampled_from(choices))
        del d[key]
        return g.name, (key, "hvp_probes") if key.startswith("hvp") else (key,), None
    if kind == "shape":
        key = draw(st.sampled_from(_labels(g)))
        v = np.asarray(d[key])
        how = draw(st.sampled_from(["axis", "scalar", "atom"]))
        if key == "species" and how == "axis":
            how = "atom"
        if how == "axis":
            d[key] = np.stack([v, v], axis=-1)
        elif how == "scalar":
            d[key] = v.reshape(-1)[0]
        else:  # one atom more (species) or one conformation more (anything else)
            d[key] = np.concatenate([v, v[:1]], axis=-1 if key == "species" and v.ndim == 1 else 0)
            if key == "coordinates":  # [n_conf + 1, ...] or, for [n, 3], one atom more
                return g.name, (), None  # the first label whose shape disagrees is named
        return g.name, QUANTITY.get(key, (key,)), None
    if kind == "dtype":
        key = draw(st.sampled_from(_labels(g)))
        v = np.asarray(d[key])
        to = draw(st.sampled_from(["text", "complex", "bool"] if key != "species" else ["float", "complex"]))
        if to == "text":
            d[key] = np.char.mod("%.17g", v).astype("S")  # numbers as text are refused, not parsed
        elif to == "complex":
            d[key] = v.astype(np.complex128) if key != "species" else np.asarray([1 + 2j] * g.n)
        elif to == "bool":
            d[key] = v > 0
        else:
            d[key] = np.asarray([6.0] * g.n)
        return g.name, (key,), None
    if kind == "nonfinite":
        key = draw(st.sampled_from([k for k in FLOAT_LABELS if k in d]))
        v = np.array(d[key], dtype=np.float64)
        flat = draw(st.integers(0, v.size - 1))
        v.reshape(-1)[flat] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        d[key] = v
        return g.name, QUANTITY.get(key, (key,)), _conf_axis_index(g, key, flat)
    if kind == "species":
        s = np.array(d["species"])
        j = draw(st.integers(0, g.n - 1))
        per_conf = s.ndim == 2
        c = draw(st.integers(0, g.n_conf - 1)) if per_conf else None
        at = (c, j) if per_conf else j
        if s.dtype.kind in "iu":
            bad = draw(st.sampled_from([0, 200, -1, 2**32 + 6] if s.dtype.kind == "i" else [0, 200]))
            s = s.astype(np.int64)
        else:
            bad = draw(st.sampled_from([b"Xx", b"X", b"", b"\xff\xfe", b"6", b"Q"]))
            s = s.astype("S4")
        s[at] = bad
        d["species"] = s
        return g.name, ("species",), c
    if kind == "coincident":
        if g.n < 2:
            return None
        coords = np.array(d["coordinates"])
        c = draw(st.integers(0, g.n_conf - 1))
        p, q = sorted(draw(st.lists(st.integers(0, g.n - 1), min_size=2, max_size=2, unique=True)))
        view = coords if coords.ndim == 2 else coords[c]
        view[q] = view[p]
        d["coordinates"] = coords
        return g.name, ("coincide", f"atoms {p} and {q}"), c
    if kind == "zero conformations":
        coords = np.asarray(d["coordinates"])
        d["coordinates"] = (coords[None] if coords.ndim == 2 else coords)[:0]
        for key in list(d):
            v = d[key]
            if key in ("species", "coordinates") or not isinstance(v, np.ndarray) or not v.ndim:
                continue
            if v.shape[0] == g.n_conf:
                d[key] = v[:0]
        if np.ndim(d["species"]) == 2:
            d["species"] = d["species"][:0]
        return g.name, ("coordinates", "conformations"), None
    if kind == "zero atoms":
        d["coordinates"] = np.zeros((g.n_conf, 0, 3))
        d["species"] = np.array([], dtype="S2")
        return g.name, ("coordinates", "atoms"), None
    if kind == "not a dataset":
        key = draw(st.sampled_from(_labels(g)))
        d[key] = draw(st.sampled_from([("group",), ("empty", "f8"), ("link", "/nowhere")]))
        return g.name, (key,), None
    if kind == "meta text":
        c = draw(st.integers(0, g.n_conf - 1))
        d["category"] = np.array([b"\xff\xfe" if i == c else b"ok" for i in range(g.n_conf)])
        return g.name, ("category",), c
    raise AssertionError(kind)


def _write_h5(path: str, case: H5Case) -> None:
    with h5py.File(path, "w") as f:
        for k, v in case.attrs.items():
            f.attrs[k] = np.bytes_(v) if isinstance(v, bytes) else v
        for g in case.groups:
            h = f.require_group(g.name) if g.name else f
            for key, v in g.data.items():
                if isinstance(v, tuple) and v[0] == "group":
                    h.create_group(key)["note"] = np.arange(3.0)
                elif isinstance(v, tuple) and v[0] == "empty":
                    h.create_dataset(key, data=h5py.Empty(v[1]))
                elif isinstance(v, tuple) and v[0] == "link":
                    h[key] = h5py.SoftLink(v[1])
                else:
                    h[key] = v
        for path_, kind in case.others:
            h = f.require_group(path_)
            if kind == "notes":
                h["readme"] = np.bytes_(b"no conformers here")
    if case.file_op is None:
        return
    with open(path, "rb") as fh:
        raw = fh.read()
    op, arg = case.file_op
    raw = {"truncate": lambda: raw[: max(0, len(raw) - arg)], "replace": lambda: arg, "prepend": lambda: arg + raw}[
        op
    ]()
    with open(path, "wb") as fh:
        fh.write(raw)


def _plain(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def _symbols_to_numbers(s) -> np.ndarray:
    s = np.asarray(s)
    if s.dtype.kind in "iu":
        return s.astype(np.int64)
    return np.array([atomic_numbers[(x.decode() if isinstance(x, bytes) else x).strip().capitalize()] for x in s])


def _expected(path: str, case: H5Case):
    """The records a valid case must read to, from what was written: (origin, fields, meta) per record."""
    e_unit = case.override.get("energy_unit") or case.attrs.get("energy_unit", "hartree")
    l_unit = case.override.get("length_unit") or case.attrs.get("length_unit", "angstrom")
    e = units.energy_factor(e_unit.decode() if isinstance(e_unit, bytes) else e_unit)
    a = units.length_factor(l_unit)
    out = []
    for g in sorted(case.groups, key=lambda g: g.name):
        d, m, n = g.data, g.n_conf, g.n
        coords = np.asarray(d["coordinates"], dtype=np.float64).reshape(m, n, 3) * a
        species = np.asarray(d["species"])
        hkey = "hessian" if "hessian" in d else "hessians" if "hessians" in d else None
        meta_keys = [
            k for k, v in d.items() if k not in LABEL_KEYS and isinstance(v, np.ndarray) and v.ndim and len(v) == m
        ]
        for i in range(m):
            fields = {
                "numbers": _symbols_to_numbers(species[i] if species.ndim == 2 else species),
                "positions": coords[i],
                "energy": float(np.float64(d["energies"][i]) * e),
                "forces": None if "forces" not in d else np.asarray(d["forces"][i], np.float64) * (e / a),
                "hessian": None
                if hkey is None
                else (np.asarray(d[hkey][i], np.float64) * (e / a**2)).reshape(n, 3, n, 3),
                "hvp_probes": None if "hvp_probes" not in d else np.asarray(d["hvp_probes"][i], np.float64),
                "hvps": None if "hvps" not in d else np.asarray(d["hvps"][i], np.float64) * (e / a**2),
            }
            meta = {k: _plain(d[k][i]) for k in meta_keys}
            meta.update(origin=f"{path}:/{g.name}[{i}]", group=f"/{g.name}")
            out.append((fields, meta))
    return out


def _same_meta(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def _message_names(msg: str, path: str, defect) -> bool:
    group, words, index = defect
    if group is not None:
        at = re.escape(f"{path}:/{group}")
        if not re.search(at + r"[/\[:]", msg):
            return False
        if index is not None and not re.search(at + r"(/[^\s:\[]+)?\[" + str(index) + r"\]", msg):
            return False
    return path in msg and (not words or any(w in msg for w in words))


def _check_h5_case(case: H5Case, outcomes: collections.Counter) -> None:
    with tempfile.TemporaryDirectory() as tmp, _watchdog():
        path = os.path.join(tmp, "fuzz.h5")
        _write_h5(path, case)
        note(f"defects: {case.defects}, kinds: {case.kinds}, file_op: {case.file_op}")
        try:
            records = read_h5(path, **case.override)
        except ValueError as err:
            msg = str(err)
            note(f"error: {msg}")
            assert case.defects, f"a valid file was refused: {msg}"
            assert any(_message_names(msg, path, d) for d in case.defects), (msg, case.defects)
            outcomes["error"] += 1
            return
        assert not case.defects, f"a defect was not refused: {case.defects}"
        expected = _expected(path, case)
        assert len(records) == len(expected), "a conformation was dropped or invented"
        for got, (fields, meta) in zip(records, expected, strict=True):
            assert got.meta["origin"] == meta["origin"]
            for name, want in fields.items():
                value = getattr(got, name)
                if want is None:
                    assert value is None, name
                else:
                    np.testing.assert_allclose(value, want, rtol=1e-13, atol=0, err_msg=f"{meta['origin']} {name}")
            assert got.meta.keys() == meta.keys()
            assert all(_same_meta(got.meta[k], v) for k, v in meta.items()), (got.meta, meta)
        outcomes["read"] += 1


def test_read_h5_fuzz(record_property):
    """`MAX_EXAMPLES` random ANI-layout files, valid or with up to two group defects and a file
    defect; see the module docstring for the contract."""
    outcomes = collections.Counter()

    @FUZZ
    @given(case=h5_cases())
    def check(case):
        outcomes["cases"] += 1
        outcomes.update(case.kinds)
        _check_h5_case(case, outcomes)

    check()
    record_property("fuzz_cases", outcomes["cases"])
    print(f"read_h5 fuzz: {dict(outcomes)}")
    assert outcomes["cases"] >= FUZZ.max_examples
    assert outcomes["read"] >= 0.1 * outcomes["cases"] and outcomes["error"] >= 0.1 * outcomes["cases"]
    assert all(outcomes[k] > 0 for k in GROUP_DEFECTS + FILE_DEFECTS), "a defect was never generated"


# ---------------------------------------------------------------------------- explicit regressions


def _co(**overrides) -> dict:
    d = dict(
        species=np.array([b"C", b"O"]),
        coordinates=np.array([[[0.0, 0, 0], [1.2, 0, 0]], [[0.0, 0, 0], [1.1, 0, 0]]]),
        energies=np.array([-113.0, -113.1]),
    )
    d.update(overrides)
    return {k: v for k, v in d.items() if v is not None}


@pytest.mark.parametrize(
    "data, pattern",
    [
        ({"coordinates": None, "energies": np.zeros(2)}, r":/mols/CO: missing dataset 'coordinates'"),  # was skipped
        ({"species": None}, r":/mols/CO: missing dataset 'species'"),  # was skipped silently
        ({"species": np.array([2**32 + 6, 8])}, r"CO/species: unknown atomic number 4294967302 at index 0"),
        ({"species": np.array([b"\xff", b"O"])}, r"CO/species: unknown element '\\\\xff' at index 0"),
        ({"energies": np.array([b"-113.0", b"-113.1"])}, r"CO/energies: expected numbers, got dtype \|S6"),
        ({"forces": np.zeros((2, 2, 3), complex)}, r"CO/forces: expected numbers, got dtype complex128"),
        ({"coordinates": np.zeros((0, 2, 3)), "energies": np.zeros(0)}, r"CO/coordinates: no conformations"),
        (
            {"coordinates": np.array([[[0.0, 0, 0], [1.2, 0, 0]], [[0.5, 0, 0], [0.5, 0, 0]]])},
            r"CO\[1\]: atoms 0 and 1 \(C, O\) coincide",
        ),
        ({"hvp_probes": np.zeros((2, 1, 2, 3)), "hvps": ("group",)}, r"CO/hvps: expected a dataset, got a group"),
        ({"energies": ("empty", "f8")}, r"CO/energies: the dataset has no data"),
        ({"forces": ("link", "/nowhere")}, r"CO/forces: expected a dataset, got a dangling link"),
        ({"source": np.array([b"ok", b"\xff"])}, r"CO/source\[1\]: not UTF-8 text"),
    ],
)
def test_h5_reader_regressions(data, pattern):
    """Defects the fuzzing found: each was a crash of another type, a silent skip (the valid group
    'ok/CO' read alone) or a wrong value; now a ValueError naming file, group, dataset and index."""
    case = H5Case([Group("mols/CO", 2, 2, _co(**data)), Group("ok/CO", 2, 2, _co())], attrs={}, override={}, others=[])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bad.h5")
        _write_h5(path, case)
        with pytest.raises(ValueError, match=pattern) as info:
            read_h5(path)
        assert path in str(info.value)


@pytest.mark.parametrize("op", [("truncate", 1), ("truncate", 10**6), ("replace", b"garbage"), ("prepend", b"x")])
def test_h5_truncated_or_garbage_file_is_a_value_error(op):
    case = H5Case([Group("CO", 2, 2, _co())], attrs={"energy_unit": "rydberg"}, override={}, others=[], file_op=op)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "cut.h5")
        _write_h5(path, case)
        with pytest.raises(ValueError, match=re.escape(path) + ": cannot open as HDF5"):
            read_h5(path)


def test_h5_root_group_and_units_attribute():
    """Conformers at the root are read (they were dropped when a subgroup had conformers too); a
    bad unit attribute names the file and the attribute."""
    case = H5Case([Group("", 2, 2, _co()), Group("sub/CO", 2, 2, _co())], attrs={}, override={}, others=[])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "root.h5")
        _write_h5(path, case)
        assert [m.meta["origin"] for m in read_h5(path)] == [
            f"{path}:/[0]",
            f"{path}:/[1]",
            f"{path}:/sub/CO[0]",
            f"{path}:/sub/CO[1]",
        ]
        case.attrs["length_unit"] = 5
        _write_h5(path, case)
        with pytest.raises(ValueError, match=re.escape(path) + r" \(root attribute 'length_unit'\): unknown length"):
            read_h5(path)


# ============================================================================ reaction xyz cases

VALID_EDITS = ("crlf", "extra columns", "trailing blanks", "swap in every frame", "unicode comment")
EDITS = (
    "truncate",
    "drop line",
    "duplicate line",
    "atom count",
    "coordinate",
    "element",
    "swap atoms",
    "empty",
    "one frame",
    "four frames",
    "junk",
    "insert junk",
    "blank line",
    "comment",
    "overlap",
    "nul",
    *VALID_EDITS,
)
JUNK_NUMBERS = ["abc", "1.2.3", "nan", "inf", "-inf", "1e999", "0x1p3", "--1", "1,5", "NaN"]
JUNK_ELEMENTS = ["Xx", "X", "x", "6", "Q", "D", "HE", "h", "c", "Uuo", "*"]
JUNK_COMMENTS = [
    "charge=1",
    "charge=0.5",
    "charge=abc",
    "charge=T",
    "charge=0.0",
    'charge="0 0"',
    "spin=2",
    'reaction="unterminated',
    "=",
    "",
    "free text, no keys",
    "Properties=species:S:1:pos:R:3",
    "Properties=Z:I:1:pos:R:3",
    'Lattice="1 2"',
    "reaction=renamed charge=0 spin=0",
]


@dataclasses.dataclass
class XyzCase:
    source: str
    text: bytes
    edits: list


@st.composite
def xyz_cases(draw) -> XyzCase:
    source = draw(st.sampled_from(REACTION_FILES))
    with open(source) as f:
        lines = f.read().split("\n")
    edits = []
    junk, insert = None, []
    for _ in range(draw(st.integers(0, 3))):
        edit = draw(st.sampled_from(EDITS))
        edits.append(edit)
        if not lines and edit not in ("empty", "junk"):
            continue
        heads = _headers(lines)
        atom_lines = [i for i in range(len(lines)) if i not in heads and i - 1 not in heads and lines[i].strip()]
        pick = lambda seq: seq[draw(st.integers(0, len(seq) - 1))] if seq else None  # noqa: E731
        if edit == "truncate":
            lines = lines[: draw(st.integers(0, len(lines) - 1))]
        elif edit == "drop line":
            del lines[draw(st.integers(0, len(lines) - 1))]
        elif edit == "duplicate line":
            i = draw(st.integers(0, len(lines) - 1))
            lines.insert(i, lines[i])
        elif edit == "atom count" and heads:
            i = pick(heads)
            lines[i] = (
                draw(st.sampled_from(["0", "-1", "three", "3.0", "", "+3", "10000000000000"]))
                if draw(st.booleans())
                else str(int(lines[i]) + draw(st.sampled_from([-2, -1, 1, 2, 100])))
            )
        elif edit in ("coordinate", "element", "overlap", "extra columns", "nul") and atom_lines:
            i = pick(atom_lines)
            fields = lines[i].split()
            if edit == "coordinate" and len(fields) >= 4:
                fields[draw(st.integers(1, 3))] = draw(st.sampled_from(JUNK_NUMBERS))
            elif edit == "element" and fields:
                fields[0] = draw(st.sampled_from(JUNK_ELEMENTS))
            elif edit == "overlap":
                j = pick(atom_lines)
                fields = fields[:1] + lines[j].split()[1:4]
            elif edit == "extra columns":
                fields = [*fields, "0.5", "tag"]
            elif edit == "nul":
                fields = [*fields[:1], "\x00", *fields[1:]]
            lines[i] = "  ".join(fields)
        elif edit == "swap atoms" and len(atom_lines) >= 2:
            i, j = pick(atom_lines), pick(atom_lines)
            lines[i], lines[j] = lines[j], lines[i]
        elif edit == "swap in every frame" and heads:
            n = int(lines[heads[0]]) if lines[heads[0]].strip().isdigit() else 0
            if n >= 2:
                a, b = sorted(draw(st.lists(st.integers(0, n - 1), min_size=2, max_size=2, unique=True)))
                for h in heads:
                    if h + 2 + b < len(lines):
                        lines[h + 2 + a], lines[h + 2 + b] = lines[h + 2 + b], lines[h + 2 + a]
        elif edit == "empty":
            lines = []
        elif edit == "one frame" and len(heads) >= 2:
            lines = lines[: heads[1]]
        elif edit == "four frames" and heads:
            block = lines[heads[-1] :]
            lines = lines + [ln for ln in block if ln.strip()] * draw(st.integers(1, 2))
        elif edit == "blank line":
            lines.insert(draw(st.integers(0, len(lines))), "")
        elif edit == "comment" and heads:
            lines[pick(heads) + 1] = draw(st.sampled_from(JUNK_COMMENTS))
        elif edit == "unicode comment" and heads:
            lines[pick(heads) + 1] += ' note="é \u2028 ü"'
        elif edit == "trailing blanks":
            lines += ["", "   ", ""]
        elif edit == "junk":
            junk = draw(st.binary(max_size=300))
        elif edit == "insert junk":
            insert.append((draw(st.floats(0, 1)), draw(st.binary(min_size=1, max_size=40))))
    text = "\n".join(lines)
    if "crlf" in edits:
        text = text.replace("\n", "\r\n")
    raw = text.encode("utf-8") if junk is None else junk
    for where, data in insert:  # raw bytes, most not UTF-8
        k = int(where * len(raw))
        raw = raw[:k] + data + raw[k:]
    return XyzCase(source, raw, edits)


def _headers(lines) -> list[int]:
    """Indices of the header lines of the complete frames of an xyz text (up to the first oddity)."""
    heads, i = [], 0
    while i < len(lines) and lines[i].strip().isdigit() and i + 1 + int(lines[i]) < len(lines):
        heads.append(i)
        i += 2 + int(lines[i])
    return heads


def _reference_frames(text: str):
    """A strict plain-xyz parse: [(numbers, positions)], or None if the text is not exactly frames
    followed by blank lines (then a reader must not succeed, unless ase reads custom columns)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    frames, i = [], 0
    try:
        while i < len(lines):
            n = int(lines[i])
            block = [ln.split() for ln in lines[i + 2 : i + 2 + n]]
            if n < 1 or len(block) != n:
                return None
            numbers = [atomic_numbers[b[0].capitalize()] for b in block]
            positions = np.array([[float(x) for x in b[1:4]] for b in block])
            frames.append((np.array(numbers), positions))
            i += 2 + n
    except (ValueError, KeyError, IndexError):
        return None
    return frames


def _check_xyz_case(case: XyzCase, outcomes: collections.Counter) -> None:
    with tempfile.TemporaryDirectory() as tmp, _watchdog():
        path = os.path.join(tmp, os.path.basename(case.source))
        with open(path, "wb") as f:
            f.write(case.text)
        note(f"edits: {case.edits}\n{case.text[:2000]!r}")
        try:
            rx = read_reaction(path)
        except ReactionFileError as err:
            msg = str(err)
            note(f"error: {msg}")
            assert set(case.edits) - set(VALID_EDITS), f"a valid file was refused: {msg}"
            assert msg.startswith(path) or path in msg, msg
            assert re.search(r"\b(line|lines|frame|frames)\b \[?\d|no frames", msg), f"no line or frame: {msg}"
            outcomes["error"] += 1
            return
        text = case.text.decode("utf-8")
        frames = _reference_frames(text)
        if frames is None:  # only custom ase columns may read where the plain parse cannot
            assert "Properties=" in text, "read a file that is not a sequence of xyz frames"
            outcomes["read"] += 1
            return
        assert len(frames) == 2 + (rx.ts_guess is not None), "a frame was dropped"
        np.testing.assert_array_equal(rx.numbers, frames[0][0])
        for got, (numbers, positions) in zip([rx.reactant, rx.product, rx.ts_guess], frames, strict=False):
            np.testing.assert_array_equal(numbers, frames[0][0])
            np.testing.assert_array_equal(got, positions)
            assert np.isfinite(got).all()
            d = np.linalg.norm(got[:, None] - got[None], axis=-1) + 10 * np.eye(len(got))
            assert d.min() >= 0.5
        outcomes["read"] += 1


def test_read_reaction_fuzz(record_property):
    """`MAX_EXAMPLES` edits of the shipped reaction files; see the module docstring for the contract."""
    assert issubclass(ReactionFileError, ValueError)
    outcomes = collections.Counter()

    @FUZZ
    @given(case=xyz_cases())
    def check(case):
        outcomes["cases"] += 1
        outcomes.update(case.edits)
        _check_xyz_case(case, outcomes)

    check()
    record_property("fuzz_cases", outcomes["cases"])
    print(f"read_reaction fuzz: {dict(outcomes)}")
    assert outcomes["cases"] >= FUZZ.max_examples
    assert outcomes["read"] >= 0.1 * outcomes["cases"] and outcomes["error"] >= 0.1 * outcomes["cases"]


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda t: t.replace("\n3\n", "\n\n3\n", 1), r"line 6: blank line where frame 1 should begin"),  # was dropped
        (lambda t: t.replace("0.050000    -1.066000", "0.050000    nan"), r"line 3: frame 0, atom 0: z = 'nan' is not"),
        (lambda t: t.replace("charge=0", "charge=0.5", 1), r"frame 0 \(line 1\): charge=0.5; only neutral"),
        (lambda t: t.replace("charge=0", 'charge="0 0"', 1), r"frame 0 \(line 1\): charge=array"),
        (lambda t: "0\n\n" + t, r"line 1: frame 0: 0 atoms"),
        (lambda t: t.replace("\nC ", "\nX ", 1), r"line 4: frame 0, atom 1: unknown element 'X'"),
        (lambda t: t.replace("\nC ", "\nXx ", 1), r"line 4: frame 0, atom 1: unknown element 'Xx'"),
        (lambda t: t[: t.rindex("\nN")], r"line 6: frame 1 declares 3 atoms but the file ends after 2"),
        (lambda t: t.replace("reaction=hcn_hnc", "\udcff", 1), r"line 2: not UTF-8 text"),
        (lambda t: t.replace("\nH ", "\nH 0.0 ", 1).replace("0.050000    -1.066000", ""), r"line 3: frame 0, atom 0"),
        (lambda t: t.replace('comment="HCN', 'comment="HCN Properties=Z:I:1:pos:R:3', 1), None),  # still reads
    ],
)
def test_reaction_reader_regressions(tmp_path, edit, pattern):
    """Defects the fuzzing found: ase stops at a blank line (the frames after it were dropped), reads
    'nan', '0 atoms' and 'X', and charge=0.5 passed as neutral; each now names its line or frame."""
    with open(os.path.join(ROOT, "data", "reactions", "hcn_hnc.xyz")) as f:
        text = edit(f.read())
    path = tmp_path / "hcn_hnc.xyz"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    if pattern is None:
        assert read_reaction(str(path)).id == "hcn_hnc"
        return
    with pytest.raises(ReactionFileError, match=re.escape(str(path)) + ": .*" + pattern):
        read_reaction(str(path))
