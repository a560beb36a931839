"""GFN2-xTB labels (phljax.datagen.xtb) and the size-scaling set builder (phljax.datagen.scale).

Needs the `scale` extra (tblite, rdkit; PySCF for the normal modes): skipped without it. Every
calculation is on water or methane (a few milliseconds per gradient).
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import pytest
from ase.build import molecule

pytest.importorskip("tblite")
pytest.importorskip("rdkit")

from phljax import units  # noqa: E402
from phljax.data import read_h5  # noqa: E402
from phljax.datagen import scale, xtb  # noqa: E402
from phljax.datagen.dft import HessianCheckError, SCFNotConvergedError  # noqa: E402
from phljax.datagen.labels import make_probes  # noqa: E402

BOHR = units.DFT_BOHR


def _distorted(name: str, seed: int = 0, sigma: float = 0.03):
    atoms = molecule(name)
    rng = np.random.default_rng(seed)
    return atoms.numbers, atoms.positions + rng.normal(0.0, sigma, atoms.positions.shape)


@pytest.fixture(scope="module")
def water_hessian():
    numbers, positions = _distorted("H2O")
    return numbers, positions, xtb.fd_hessian(numbers, positions, check_columns=None)


def test_gradient_is_the_derivative_of_the_energy():
    numbers, positions = _distorted("CH4")
    out = xtb.singlepoint(numbers, positions)
    g = out["gradient"]
    assert g.shape == (5, 3) and np.abs(g).max() > 1e-3  # off the minimum
    h = 1e-3  # Angstrom
    fd = np.zeros_like(g)
    for i in range(5):
        for a in range(3):
            e = []
            for sign in (1, -1):
                x = positions.copy()
                x[i, a] += sign * h
                e.append(xtb.singlepoint(numbers, x)["energy"])
            fd[i, a] = (e[0] - e[1]) / (2 * h / BOHR)  # Hartree/Bohr
    # central differences: truncation ~h^2 g''' ~ 1e-8, SCC noise ~1e-10 / h ~ 1e-7 Hartree/Bohr
    np.testing.assert_allclose(g, fd, atol=2e-6 * np.abs(g).max() + 1e-8)
    assert np.abs(g.sum(0)).max() < 1e-8  # translation invariance of the analytic gradient


def test_fd_hessian_symmetric_step_independent_and_translation_invariant(water_hessian):
    numbers, positions, out = water_hessian
    h = out["hessian"]
    assert h.shape == (3, 3, 3, 3) and out["n_gradients"] == 1 + 2 * 9 + 2 * 9
    # the raw FD matrix (each column an independent difference) is symmetric to the FD error
    assert out["asym_rel"] < 1e-4 and out["sum_rule_rel"] < 1e-4
    assert out["step_rel"] < 2e-4  # all 9 columns recomputed with 2h agree
    flat = h.reshape(9, 9)
    np.testing.assert_array_equal(flat, flat.T)  # stored symmetrised
    other = xtb.fd_hessian(numbers, positions, step=1e-3, check_columns=0)["hessian"]
    assert np.abs(other - h).max() < 2e-4 * np.abs(h).max()
    # the Hessian is the gradient's derivative (in Hartree/Bohr^2): a step along v changes g by H v
    v = np.random.default_rng(1).standard_normal((3, 3))
    g = [xtb.singlepoint(numbers, positions + s * 1e-3 * v)["gradient"] for s in (1, -1)]
    hv = np.einsum("iajb,jb->ia", h, v)
    assert np.abs((g[0] - g[1]) / (2e-3 / BOHR) - hv).max() < 1e-4 * np.abs(hv).max()


def test_fd_hessian_rejects_a_bad_step():
    numbers, positions = _distorted("H2O")
    with pytest.raises(HessianCheckError, match="not symmetric"):  # 0.2 A is no small step
        xtb.fd_hessian(numbers, positions, step=0.2)
    loose = xtb.XTBHessianLimits(max_asym_rel=1.0, max_sum_rule_rel=1.0)  # only the second step checks
    with pytest.raises(HessianCheckError, match="depends on the step.*h = 0.05 A"):  # truncation ~h^2
        xtb.fd_hessian(numbers, positions, step=0.05, limits=loose)
    assert xtb.fd_hessian(numbers, positions, step=2e-3, limits=loose)["step_rel"] < 1e-4
    with pytest.raises(ValueError, match="step must be > 0"):
        xtb.fd_hessian(numbers, positions, step=0.0)
    with pytest.raises(ValueError, match=r"positions \[N, 3\]"):
        xtb.fd_hessian(numbers, positions[:2])


def test_unconverged_scc_raises():
    numbers, positions = _distorted("H2O")
    with pytest.raises(SCFNotConvergedError, match="not converged"):
        xtb.singlepoint(numbers, positions, xtb.XTBLevel(max_iterations=1))
    with pytest.raises(SCFNotConvergedError, match="tblite refuses"):  # coincident atoms
        xtb.singlepoint(numbers, np.zeros((3, 3)))


@pytest.mark.parametrize("kind", ["gaussian", "onehot", "orthogonal", "rademacher"])
def test_hvp_labels_equal_hessian_times_v(water_hessian, kind):
    numbers, positions, out = water_hessian
    probes = make_probes(kind, 4, 3, np.random.default_rng(2))
    if kind == "orthogonal":  # one partial block of 4 orthogonal probes of norm^2 D = 9
        flat = probes.reshape(4, 9)
        np.testing.assert_allclose(flat @ flat.T, 9 * np.eye(4), atol=1e-12)
    hv = xtb.fd_hvp(numbers, positions, probes)
    assert hv["n_gradients"] == 1 + 2 * 4 and hv["hvps"].shape == (4, 3, 3)
    exact = np.einsum("iajb,kjb->kia", out["hessian"], probes)
    assert np.abs(hv["hvps"] - exact).max() < 1e-4 * np.abs(exact).max()
    np.testing.assert_allclose(hv["energy"], out["energy"], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="non-zero"):
        xtb.fd_hvp(numbers, positions, np.zeros((1, 3, 3)))


def test_relax_reaches_a_minimum_with_real_frequencies():
    from phljax.datagen.sampling import normal_modes

    numbers, positions = _distorted("H2O", sigma=0.1)
    out = xtb.relax(numbers, positions, fmax=0.005)
    assert out["fmax"] <= 0.005 and out["n_steps"] > 0
    np.testing.assert_allclose(np.abs(out["gradient"]).max() * units.DFT_HARTREE / BOHR, out["fmax"], rtol=1.0)
    h = xtb.fd_hessian(numbers, out["positions"])["hessian"]
    freq = normal_modes(numbers, out["positions"], h)["freq_cm"]
    assert freq.shape == (3,) and np.all(freq > 1000)  # bend ~1500, stretches ~3600 cm^-1 at GFN2-xTB
    with pytest.raises(SCFNotConvergedError, match="LBFGS did not converge in 2 steps"):
        xtb.relax(numbers, positions, fmax=1e-6, max_steps=2)


# -- the size-scaling set ------------------------------------------------------------------------


def test_scale_molecules_cover_the_size_bins():
    counts = [scale.count_atoms(m.smiles) for m in scale.SCALE_MOLECULES]  # checks neutral closed-shell CHNO
    bins = collections.Counter(scale.size_bin(n) for n in counts)
    assert len(bins) >= 6 and min(bins.values()) >= 4, bins
    assert min(counts) <= 12 and max(counts) >= 150 and sum(n >= 150 for n in counts) >= 3
    assert {m.family for m in scale.SCALE_MOLECULES} >= {"alkane", "alcohol", "amide", "peptide", "aromatic"}
    with pytest.raises(ValueError, match="outside the size bins"):
        scale.size_bin(5)
    with pytest.raises(ValueError, match="neutral closed-shell"):
        scale.count_atoms("CCCl")


def test_test_subset_is_dealt_round_robin_per_bin():
    cfg = scale.ScaleConfig(n_test_per_bin=8, n_nms=30)
    counts = scale.n_test_samples(cfg)
    by_bin: dict[str, int] = {}
    for m in cfg.molecules:
        b = scale.size_bin(scale.count_atoms(m.smiles))
        by_bin[b] = by_bin.get(b, 0) + counts[m.name]
    assert set(by_bin.values()) == {8}
    assert scale.label_kind(cfg, 152, 0, 2) == "hessian" and scale.label_kind(cfg, 152, 2, 2) == "pool"
    assert scale.label_kind(cfg, 24, 2, 2) == "train_hessian"


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """Water and methane through the whole builder: 3 samples each, 1 test sample per bin; water's
    training samples have Hessians (pools exact from them), methane's FD pools of 2 probes per kind."""
    cfg = scale.ScaleConfig(
        molecules=(scale.ScaleMolecule("water", "O", "tiny"), scale.ScaleMolecule("methane", "C", "alkane")),
        n_nms=3, n_test_per_bin=1, train_hessian_max_atoms=3, pool_size=2, size_bins=(1, 4, 10),
    )  # fmt: skip
    root = tmp_path_factory.mktemp("scale")
    cache, out = str(root / "cache"), str(root / "out")
    scale.run(cfg, cache)
    summary = scale.assemble(cache, out, "tiny")
    return cfg, cache, out, summary


def test_builder_writes_files_that_phljax_data_reads(tiny_set):
    cfg, cache, out, summary = tiny_set
    kinds = ("gaussian", "onehot", "rademacher")
    assert summary["files"] == {"train": "tiny-train.h5", "test": "tiny-test.h5", "minima": "tiny-minima.h5",
                                **{f"train-{k}": f"tiny-train-{k}.h5" for k in kinds}}  # fmt: skip
    assert summary["n_geometries"] == 6 and summary["n_rejected"] == 0 and summary["n_settled"] == 6
    assert summary["bins"] == {
        "1-3": {"molecules": 1, "train": 2, "test": 1, "train_hessian": 2, "complete": True},
        "4-9": {"molecules": 1, "train": 2, "test": 1, "train_hessian": 0, "complete": True},
    }
    with open(os.path.join(out, "tiny-bins.json")) as f:
        assert json.load(f)["bins"] == summary["bins"]  # fmt: skip
    train, test, minima = (read_h5(os.path.join(out, f"tiny-{p}.h5")) for p in ("train", "test", "minima"))
    assert len(train) == 4 and len(test) == 2 and len(minima) == 2
    assert all(m.hessian is not None and m.meta["split"] == "test" for m in test)
    assert all(m.meta["split"] == "minimum" and m.meta["category"] == "minimum" for m in minima)
    by_name = {n: [m for m in train if m.meta["name"] == n] for n in ("water", "methane")}
    assert all(m.hvp_probes is None and m.hessian is not None for m in by_name["water"])
    assert all(m.hvp_probes is None and m.hessian is None for m in by_name["methane"])
    pools = {k: read_h5(os.path.join(out, f"tiny-train-{k}.h5")) for k in kinds}
    for mols in pools.values():  # every training sample, that kind's probes, no Hessian
        assert len(mols) == 4 and all(m.hessian is None and m.hvp_probes.shape[0] == 2 for m in mols)
    assert all(np.count_nonzero(m.hvp_probes.reshape(2, -1), axis=1).tolist() == [1, 1] for m in pools["onehot"])
    assert all(set(np.abs(m.hvp_probes).ravel()) == {1.0} for m in pools["rademacher"])
    for w in (m for m in pools["gaussian"] if m.meta["name"] == "water"):  # pools from the stored Hessian: exact
        h = next(x.hessian for x in by_name["water"] if x.meta["index"] == w.meta["index"])
        np.testing.assert_allclose(w.hvps, np.einsum("iajb,kjb->kia", h, w.hvp_probes), rtol=1e-10, atol=1e-12)
    by_name["methane"] = [m for m in pools["gaussian"] if m.meta["name"] == "methane"]
    assert {m.meta["size_bin"] for m in train} == {"1-3", "4-9"} and {m.meta["smiles"] for m in train} == {"O", "C"}
    # units: the file holds Hartree/Angstrom, the records eV/Angstrom; the labels are the cache's
    rec = np.load(os.path.join(cache, "methane", "nms_001.npz"))
    m = next(x for x in by_name["methane"] if x.meta["index"] == 1)
    np.testing.assert_allclose(m.energy, float(rec["energy"]) * units.HARTREE, rtol=1e-14)
    np.testing.assert_allclose(m.forces, -rec["gradient"] * units.HARTREE / units.BOHR, rtol=1e-14)
    np.testing.assert_allclose(m.hvps, rec["pool_gaussian_hvps"] * units.HARTREE / units.BOHR**2, rtol=1e-14)
    # the stored HVPs are H v of the xTB surface at that geometry
    h = xtb.fd_hessian(m.numbers, m.positions, cfg.level, check_columns=0)["hessian"]
    exact = np.einsum("iajb,kjb->kia", h, m.hvp_probes)
    assert np.abs(rec["pool_gaussian_hvps"] - exact).max() < 1e-4 * np.abs(exact).max()
    # samples are distorted minima: non-zero forces, energies above the minimum's
    e_min = next(x.energy for x in minima if x.meta["name"] == "methane")
    assert all(x.energy > e_min for x in by_name["methane"]) and np.abs(m.forces).max() > 1e-2
    card = open(os.path.join(cache, "summary.json")).read()
    assert json.loads(card)["n_geometries"] == 6


def test_builder_resumes_without_recomputing_and_refuses_another_config(tiny_set):
    cfg, cache, _, _ = tiny_set
    files = sorted(p for p in os.listdir(os.path.join(cache, "methane")) if p.endswith(".npz"))
    stamps = {p: os.stat(os.path.join(cache, "methane", p)).st_mtime_ns for p in files}
    os.remove(os.path.join(cache, "methane", "nms_002.npz"))
    scale.run(cfg, cache, ["methane"])
    after = {p: os.stat(os.path.join(cache, "methane", p)).st_mtime_ns for p in files}
    assert [p for p in files if after[p] != stamps[p]] == ["nms_002.npz"]  # only the missing one, again
    stop = os.path.join(cache, "STOP")
    open(stop, "w").close()
    os.remove(os.path.join(cache, "methane", "nms_001.npz"))
    scale.run(cfg, cache)
    assert not os.path.exists(os.path.join(cache, "methane", "nms_001.npz"))  # stopped before it
    os.remove(stop)
    scale.run(cfg, cache)
    assert os.path.exists(os.path.join(cache, "methane", "nms_001.npz"))
    with pytest.raises(ValueError, match=r"config.json: the cache was made with another configuration.*n_nms"):
        scale.run(scale.ScaleConfig(molecules=cfg.molecules, n_nms=4, size_bins=cfg.size_bins), cache)
    with pytest.raises(ValueError, match="unknown molecule names"):
        scale.run(cfg, cache, ["ethane"])


def test_scale_card_renders(tiny_set):
    from phljax.datagen.card import render_scale_card

    _, _, _, summary = tiny_set
    card = render_scale_card(summary, "tiny")
    assert "Status: **complete**" in card and "deliberately not the reaction set's" in card
    assert "| methane | alkane | 5 | 4-9 | 2 | 1 | 0 |" in card and "| water | tiny | 3 | 1-3 | 2 | 1 | 2 |" in card
    assert "onehot, gaussian, rademacher" in card
