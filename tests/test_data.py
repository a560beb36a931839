"""Data: ANI-HDF5 round trips and units, clear errors, splits, reference energies, static batches.

Unit factors are checked against CODATA values written here, not against phljax.units.
"""

from __future__ import annotations

import json

import h5py
import jax
import numpy as np
import pytest

from phljax import data as phdata
from phljax.data import Molecule, read_h5, write_h5
from phljax.train.loop import split_batches

HARTREE_EV = 27.211386  # CODATA 2018: 27.211386245988 eV
KCAL_MOL_EV = 0.0433641  # 4.184 kJ/mol / 96.485 kJ/mol/eV
BOHR_A = 0.52917721  # CODATA 2018: 0.529177210903 A


def _assert_same(a: Molecule, b: Molecule, rtol=1e-12):
    np.testing.assert_array_equal(a.numbers, b.numbers)
    np.testing.assert_allclose(a.positions, b.positions, rtol=rtol, atol=1e-14)
    np.testing.assert_allclose(a.energy, b.energy, rtol=rtol)
    np.testing.assert_allclose(a.forces, b.forces, rtol=rtol, atol=1e-14)
    np.testing.assert_allclose(a.hessian, b.hessian, rtol=rtol, atol=1e-14)


# -- HDF5 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("energy_unit", ["hartree", "ev", "kcal/mol"])
def test_h5_round_trip(molecules, tmp_path, energy_unit):
    path = tmp_path / "round.h5"
    write_h5(path, molecules, energy_unit=energy_unit)
    back = read_h5(path)  # the file's energy_unit attribute is honoured
    assert len(back) == len(molecules)
    key = lambda m: (m.meta["name"], m.meta["index"])  # noqa: E731
    for a, b in zip(sorted(molecules, key=key), sorted(back, key=key), strict=True):
        _assert_same(a, b)
        assert b.meta["category"] == "nms" and b.meta["origin"].startswith(f"{path}:/")
    # the order is deterministic: groups sorted by path, conformers by index
    assert [m.meta["origin"] for m in read_h5(path)] == [m.meta["origin"] for m in back]


def test_h5_units_against_codata(molecules, tmp_path):
    mol = molecules[5]
    path = tmp_path / "units.h5"
    write_h5(path, [mol], energy_unit="ev")
    with h5py.File(path) as f:
        (name,) = f.keys()
        assert f.attrs["energy_unit"] == "ev"
        np.testing.assert_allclose(f[name]["energies"][0], mol.energy, rtol=1e-15)

    # the file says eV; the caller overrides: read as Hartree, as kcal/mol, with Bohr lengths
    as_hartree = read_h5(path, energy_unit="hartree")[0]
    np.testing.assert_allclose(as_hartree.energy, mol.energy * HARTREE_EV, rtol=1e-7)
    np.testing.assert_allclose(as_hartree.forces, mol.forces * HARTREE_EV, rtol=1e-7)
    np.testing.assert_allclose(as_hartree.hessian, mol.hessian * HARTREE_EV, rtol=1e-7)
    as_kcal = read_h5(path, energy_unit="kcal/mol")[0]
    np.testing.assert_allclose(as_kcal.energy, mol.energy * KCAL_MOL_EV, rtol=1e-6)
    bohr = read_h5(path, energy_unit="hartree", length_unit="bohr")[0]
    np.testing.assert_allclose(bohr.positions, mol.positions * BOHR_A, rtol=1e-8)
    np.testing.assert_allclose(bohr.forces, mol.forces * HARTREE_EV / BOHR_A, rtol=1e-7)
    np.testing.assert_allclose(bohr.hessian, mol.hessian * HARTREE_EV / BOHR_A**2, rtol=1e-7)

    with pytest.raises(ValueError, match="unknown energy unit"):
        read_h5(path, energy_unit="rydberg")


def _ani_group(g, numbers_or_symbols, coords, energies, forces=None, hessian=None):
    g["species"] = numbers_or_symbols
    g["coordinates"] = coords
    g["energies"] = energies
    if forces is not None:
        g["forces"] = forces
    if hessian is not None:
        g["hessian"] = hessian


def test_h5_ani_layout_without_attributes(molecules, tmp_path):
    """A TorchANI-style file: no unit attributes (Hartree, Angstrom), nested groups, symbols or
    numbers, Hessians as [3N, 3N] or [N, 3, N, 3]."""
    h2o = [m for m in molecules if m.meta["name"] == "H2O"][:2]
    nh3 = [m for m in molecules if m.meta["name"] == "NH3"][:3]
    ha = HARTREE_EV
    path = tmp_path / "ani.h5"
    with h5py.File(path, "w") as f:
        _ani_group(
            f.create_group("reactions/r0001/H2O"),
            np.array([b"O", b"H", b"H"]),
            np.stack([m.positions for m in h2o]),
            np.array([m.energy for m in h2o]) / ha,
            np.stack([m.forces for m in h2o]) / ha,
            np.stack([m.hessian.reshape(9, 9) for m in h2o]) / ha,  # [n_conf, 3N, 3N]
        )
        _ani_group(
            f.create_group("reactions/r0002/NH3"),
            np.array([7, 1, 1, 1]),  # atomic numbers
            np.stack([m.positions for m in nh3]),
            np.array([m.energy for m in nh3]) / ha,
            np.stack([m.forces for m in nh3]) / ha,
            np.stack([m.hessian for m in nh3]) / ha,  # [n_conf, N, 3, N, 3]
        )
        f["reactions/r0002/NH3/category"] = np.array([b"ts", b"r", b"p"])
    back = read_h5(path)
    assert len(back) == 5
    for a, b in zip(h2o + nh3, back, strict=True):
        _assert_same(a, b, rtol=2e-8)  # 27.211386 vs the exact CODATA factor phljax uses
    assert back[0].meta["origin"] == f"{path}:/reactions/r0001/H2O[0]"
    assert [m.meta["category"] for m in back[2:]] == ["ts", "r", "p"]


def _write_one(path, **overrides):
    mol = dict(
        species=np.array([b"C", b"O"]),
        coordinates=np.array([[[0.0, 0, 0], [1.2, 0, 0]], [[0.0, 0, 0], [1.1, 0, 0]]]),
        energies=np.array([-113.0, -113.1]),
        forces=np.zeros((2, 2, 3)),
    )
    mol.update(overrides)
    with h5py.File(path, "w") as f:
        g = f.create_group("mols/CO")
        for k, v in mol.items():
            if v is not None:
                g[k] = v


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({"energies": None}, r":/mols/CO: missing dataset 'energies'"),
        ({"forces": np.zeros((2, 3, 3))}, r":/mols/CO/forces: expected shape \(2, 2, 3\), got \(2, 3, 3\)"),
        ({"coordinates": np.zeros((2, 2, 2))}, r":/mols/CO/coordinates: expected \[n_conf, n_atoms, 3\]"),
        ({"species": np.array([b"C", b"O", b"O"])}, r":/mols/CO/species: 3 atoms but coordinates have 2"),
        ({"energies": np.array([-113.0, np.nan])}, r":/mols/CO\[1\]: energy has a non-finite value"),
        (
            {"forces": np.where(np.arange(12).reshape(2, 2, 3) == 10, np.inf, 0.0)},
            r"CO\[1\]: forces has a non-finite value at index \(1, 1\)",
        ),
        ({"species": np.array([b"C", b"Xx"])}, r":/mols/CO/species: unknown element 'Xx' at index 1"),
        ({"species": np.array([6, 0])}, r":/mols/CO/species: unknown atomic number 0 at index 1"),
    ],
)
def test_h5_errors_name_file_key_and_index(tmp_path, overrides, pattern):
    path = tmp_path / "bad.h5"
    _write_one(path, **overrides)
    with pytest.raises(ValueError, match=pattern) as info:
        read_h5(path)
    assert str(path) in str(info.value)


def test_h5_missing_file_and_empty_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.h5"):
        read_h5(tmp_path / "nothere.h5")
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f.create_group("nothing")
    with pytest.raises(ValueError, match="no group holds both"):
        read_h5(tmp_path / "empty.h5")


def test_unknown_element_for_the_model(molecules):
    fluoro = Molecule(
        np.array([9, 1]), np.array([[0.0, 0, 0], [0.92, 0, 0]]), 0.0, np.zeros((2, 3)), meta={"origin": "x.h5:/HF[3]"}
    )
    with pytest.raises(ValueError, match=r"x.h5:/HF\[3\]: element\(s\) \[9\] not in the model's elements"):
        phdata.check_elements([*molecules[:2], fluoro], (1, 6, 7, 8))


def test_molecule_record_validation():
    where = {"origin": "f.h5:/CH[2]"}
    with pytest.raises(ValueError, match=r"f.h5:/CH\[2\]: unknown atomic number\(s\) \[0, 200\]"):
        Molecule(np.array([6, 200, 0]), np.zeros((3, 3)), meta=where)
    with pytest.raises(ValueError, match=r"f.h5:/CH\[2\]: forces has shape \(2, 3\), expected \(3, 3\)"):
        Molecule(np.array([6, 1, 1]), np.zeros((3, 3)), 0.0, np.zeros((2, 3)), meta=where)
    with pytest.raises(ValueError, match=r"f.h5:/CH\[2\]: positions has a non-finite value at index \(1, 2\)"):
        Molecule(np.array([6, 1]), np.array([[0.0, 0, 0], [1, 0, np.nan]]), meta=where)
    with pytest.raises(ValueError, match="hvp_probes and hvps come together"):
        Molecule(np.array([6, 1]), np.zeros((2, 3)), hvp_probes=np.zeros((1, 2, 3)), meta=where)
    flat = Molecule(np.array([6, 1]), np.zeros((2, 3)), hessian=np.arange(36.0).reshape(6, 6))
    np.testing.assert_array_equal(flat.hessian.reshape(6, 6), np.arange(36.0).reshape(6, 6))  # [3N, 3N] accepted


def test_h5_probes_and_hvps_round_trip(molecules, tmp_path):
    rng = np.random.default_rng(0)
    mols = []
    for m in molecules[:6]:
        v = rng.normal(size=(2, m.n_atoms, 3))
        hv = np.einsum("iajb,kjb->kia", m.hessian, v)
        mols.append(Molecule(m.numbers, m.positions, m.energy, m.forces, None, v, hv, meta=dict(m.meta)))
    path = tmp_path / "hvps.h5"
    write_h5(path, mols)
    with h5py.File(path) as f:
        assert all("hessian" not in g for g in f.values())
    back = read_h5(path)
    for a, b in zip(mols, back, strict=True):
        assert b.hessian is None and b.num_probes == 2
        np.testing.assert_allclose(b.hvp_probes, a.hvp_probes, rtol=1e-15)
        np.testing.assert_allclose(b.hvps, a.hvps, rtol=1e-12, atol=1e-14)


# -- splits, reference energies -----------------------------------------------------------------------


def test_split_is_a_deterministic_partition():
    a = phdata.split(103, (0.8, 0.1, 0.1), seed=3)
    b = phdata.split(103, (0.8, 0.1, 0.1), seed=3)
    c = phdata.split(103, (0.8, 0.1, 0.1), seed=4)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    assert [len(x) for x in a] == [82, 11, 10]  # bounds at round(0.8 * 103) = 82 and round(0.9 * 103) = 93
    np.testing.assert_array_equal(np.sort(np.concatenate(a)), np.arange(103))
    with pytest.raises(ValueError, match="sum to 1"):
        phdata.split(10, (0.5, 0.2))


def test_fit_atomic_energies_recovers_per_element_energies():
    known = {1: -13.6, 6: -1027.4, 7: -1484.2, 8: -2040.9}  # eV
    elements = (1, 6, 7, 8, 9)  # fluorine absent from the data -> 0
    rng = np.random.default_rng(1)
    formulas = [[8, 1, 1], [7, 1, 1, 1], [6, 1, 1, 1, 1], [6, 8, 1, 1], [6, 8], [7, 7], [1, 1], [6, 6, 1, 1]]
    mols = []
    for numbers in formulas * 3:
        n = len(numbers)
        energy = sum(known[z] for z in numbers)
        mols.append(Molecule(np.array(numbers), rng.normal(size=(n, 3)), energy, np.zeros((n, 3))))
    fitted = phdata.fit_atomic_energies(mols, elements)
    np.testing.assert_allclose(fitted, [known[1], known[6], known[7], known[8], 0.0], rtol=1e-10)


def _isomers(formulas, rng):
    return [Molecule(np.array(z), rng.normal(size=(len(z), 3)), -1.0 * len(z), np.zeros((len(z), 3))) for z in formulas]


def test_unidentified_formulas_flags_compositions_outside_the_training_span():
    # the leave-reactions-out fold 0 of the bundled set: training on C2H4O, CH2O, CH2O2, CH3NO and
    # HNO2 fixes O, C + 2H and H + N but not C, H and N apart, so C2H3N, CHN and CHNO (null vector
    # (C, H, N, O) = (-2, 1, -1, 0) has a non-zero product with each) are not identified; C3H6O2 is
    rng = np.random.default_rng(0)
    train = _isomers([[6, 6, 1, 1, 1, 1, 8], [6, 1, 1, 8], [6, 1, 1, 8, 8], [6, 1, 1, 1, 7, 8], [1, 7, 8, 8]], rng)
    test = _isomers([[6, 6, 1, 1, 1, 7], [6, 1, 7], [6, 1, 7, 8], [6, 6, 6, 1, 1, 1, 1, 1, 1, 8, 8]], rng)
    elements = (1, 6, 7, 8)
    assert phdata.unidentified_formulas(train, test, elements) == ["C2H3N", "CHN", "CHNO"]
    assert phdata.unidentified_formulas(train, test[3:], elements) == []
    assert phdata.unidentified_formulas([], test[:1], elements) == ["C2H3N"]
    # and that is why: the fitted energies of two exact solutions differ there, not on the span
    counts = phdata.composition_matrix(train, elements)
    assert np.linalg.matrix_rank(counts) == 3
    null = np.array([1.0, -2.0, -1.0, 0.0])  # (H, C, N, O) order of `elements`
    np.testing.assert_allclose(counts @ null, 0.0, atol=1e-12)
    assert abs(phdata.composition_matrix(test[:1], elements) @ null).item() > 0.5


# -- padded batches -----------------------------------------------------------------------------------


def test_batches_have_static_shapes_and_hold_every_molecule_once(molecules):
    cutoff = 2.0  # some pairs are beyond it, so molecules have different edge counts
    budget = phdata.budget_for(molecules, 5, cutoff, with_hessian=True)
    batches = list(phdata.iterate_batches(molecules, budget, cutoff, shuffle_seed=7))
    shapes = {tuple((x.shape, x.dtype) for x in batch if x is not None) for batch in batches}
    assert len(shapes) == 1, "every batch of an epoch must have the same shapes (one compilation)"
    assert len(batches) >= len(molecules) // 5
    seen = np.concatenate([b.graph_index[b.graph_mask] for b in batches])
    np.testing.assert_array_equal(np.sort(seen), np.arange(len(molecules)))
    for b in batches:
        # padding: nodes in the last graph, edges are self-loops of the last node, graph masked
        assert not b.graph_mask[-1] and b.node_mask.sum() == b.n_atoms.sum()
        assert np.all(b.node_graph[~b.node_mask] == budget.n_graphs - 1)
        assert np.all(b.senders[~b.edge_mask] == budget.n_nodes - 1)
        assert np.all(b.receivers[~b.edge_mask] == budget.n_nodes - 1)
        for g in np.flatnonzero(b.graph_mask):
            m = molecules[b.graph_index[g]]
            nodes = b.graph_nodes[g, : m.n_atoms]
            np.testing.assert_allclose(b.positions[nodes], m.positions, rtol=1e-6)
            np.testing.assert_allclose(b.forces[nodes], m.forces, rtol=1e-6)
            np.testing.assert_allclose(b.energy[g], m.energy, rtol=1e-6)
            # local-column Hessian: the rows of the molecule's own block
            np.testing.assert_allclose(b.hessian[nodes][:, :, : m.n_atoms], m.hessian, rtol=1e-6, atol=1e-6)
            assert np.all(b.hessian[nodes][:, :, m.n_atoms :] == 0)
            # edges: exactly the molecule's pairs within the cutoff, within the molecule
            s, r = phdata.edges_within(m.positions, cutoff)
            in_graph = b.edge_mask & np.isin(b.senders, nodes)
            local = zip(b.senders[in_graph] - nodes[0], b.receivers[in_graph] - nodes[0], strict=True)
            assert set(local) == set(zip(s, r, strict=True))


def test_batch_budget_errors(molecules):
    budget = phdata.budget_for(molecules[:6], 2, 5.0)  # sized for H2O only
    with pytest.raises(ValueError, match="do not fit the batch budget"):
        phdata.make_batch([molecules[12]], budget, 5.0)  # CH4
    with pytest.raises(ValueError, match="3 molecules do not fit a budget of 2 graphs"):
        phdata.make_batch(molecules[:3], budget, 5.0)
    with_h = phdata.budget_for(molecules[:6], 2, 5.0, with_hessian=True)
    no_h = Molecule(
        molecules[0].numbers, molecules[0].positions, 0.0, np.zeros((3, 3)), meta={"origin": "f.h5:/H2O[4]"}
    )
    with pytest.raises(ValueError, match=r"f.h5:/H2O\[4\]: this scheme needs a reference Hessian"):
        phdata.make_batch([no_h], with_h, 5.0)


def test_global_batches_have_static_shapes(run):
    for split in ("train", "val", "test"):
        batches = list(split_batches(run, split, shuffle_seed=1))
        assert len(batches) == int(np.ceil(len(run.splits[split]) / run.config.batch_size))
        shapes = {jax.tree.map(lambda x: (x.shape, x.dtype), b) for b in batches}
        assert len(shapes) == 1
        (shape,) = shapes
        assert shape.positions == ((1, run.budget.n_nodes, 3), np.float32)


def test_each_step_traces_once_per_run(trained, run):
    """`phljax.train` over 2 epochs of several batches traces the model 3 times: once each for the
    train step, the validation step and the test evaluation, never once per batch or epoch."""
    config, _, traces, _ = trained
    with open(f"{config.workdir}/metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert run.steps_per_epoch > 1 and steps == [run.steps_per_epoch, 2 * run.steps_per_epoch]
    assert traces == 3
