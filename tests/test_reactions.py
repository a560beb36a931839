"""The reaction data pipeline end to end on HCN -> HNC at Hartree-Fock/STO-3G (cheap, same code path).

What is checked: a verified TS (one imaginary frequency) whose IRC relaxes to reactant and
product; a minimum is rejected as a TS; resuming recomputes nothing; the three HDF5 files
round-trip through phljax's reader with category, reaction and point; finite-difference HVPs
agree with analytic Hessian-vector products; bad reaction files and failed SCFs never become data.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("pyscf")
if importlib.util.find_spec("sella") is None:
    pytest.skip("sella not installed (pip install -e .[data])", allow_module_level=True)

from phljax.data import read_h5  # noqa: E402
from phljax.datagen import dft, labels, reactions  # noqa: E402
from phljax.datagen.cache import load_json, save_json  # noqa: E402
from phljax.datagen.card import render_reaction_card  # noqa: E402
from phljax.datagen.reactions import structure, workflow  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HCN = os.path.join(ROOT, "data", "reactions", "hcn_hnc.xyz")
CHEAP = dft.LevelOfTheory(xc="hf", basis="sto-3g", grid_level=0, conv_tol=1e-10, dispersion=False)
CFG = reactions.ReactionConfig(
    level=CHEAP, guess_basis="sto-3g", neb_images=5, neb_steps=40, neb_fmax=0.5,
    irc_dx=0.2, irc_steps=15, irc_fmax=0.2, n_irc=2, n_nms=2,
)  # fmt: skip


X64_AT_IMPORT = __import__("jax").config.jax_enable_x64


def test_sella_import_leaves_jax_config_alone():
    """`import sella` switches the process to float64; phljax must not let that leak into training."""
    import jax

    reactions.import_sella()
    assert jax.config.jax_enable_x64 == X64_AT_IMPORT


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The whole pipeline on HCN -> HNC, once per module."""
    d = str(tmp_path_factory.mktemp("rxn_cache"))
    summary = reactions.run(CFG, reactions.read_reactions([HCN]), d, progress=False)
    return d, summary


def _copy_without(cache_dir: str, tmp_path, names: list[str]) -> str:
    """A copy of the module's cache without some of hcn_hnc's files (as if never made)."""
    copy = str(tmp_path / "copy")
    shutil.copytree(cache_dir, copy)
    for f in names:
        os.remove(os.path.join(copy, "hcn_hnc", f))
    return copy


@pytest.fixture
def datagen_log():
    """The messages logged to phljax.datagen during the test (worker processes' records included)."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("phljax.datagen")
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


def test_pipeline_end_to_end(cache):
    d, summary = cache
    info = summary["reactions"]["hcn_hnc"]
    assert info["failures"] == [] and info["rejected"] == []
    assert (info["n_rtp"], info["n_irc"], info["n_nms"]) == (3, 2 * CFG.n_irc, 3 * CFG.n_nms)
    ts = np.load(os.path.join(d, "hcn_hnc", "ts.npz"))
    assert reactions.count_imaginary(ts["freq_cm"], CFG.imag_tol_cm) == 1
    irc = np.load(os.path.join(d, "hcn_hnc", "irc.npz"))
    # each branch ends once at its minimum (forces below irc_fmax), not after irc_steps steps
    assert 3 <= len(irc["forward"]) <= CFG.irc_steps and 3 <= len(irc["reverse"]) <= CFG.irc_steps
    assert ts["imaginary_cm"] < -500  # a real bond-breaking saddle, not a soft mode
    barrier = info["barrier_kcal"]
    assert 20 < barrier < 100, barrier  # HCN -> HNC at HF/STO-3G: a few tens of kcal/mol
    assert __import__("jax").config.jax_enable_x64 == X64_AT_IMPORT  # Sella ran in a scoped x64 context


def test_irc_ends_relax_to_reactant_and_product(cache):
    d, _ = cache
    irc = np.load(os.path.join(d, "hcn_hnc", "irc.npz"))
    assert sorted([str(irc["end_forward"]), str(irc["end_reverse"])]) == ["product", "reactant"]
    # the path descends from the TS both ways
    for direction in ("forward", "reverse"):
        e = irc[f"energies_{direction}_eV"]
        assert e[-1] < e[0]


def test_ts_verification_rejects_a_minimum(cache):
    d, _ = cache
    r = np.load(os.path.join(d, "hcn_hnc", "rtp_reactant.npz"))
    with pytest.raises(reactions.TSVerificationError, match="0 imaginary"):
        reactions.verify_ts(r["numbers"], r["positions"], r["hessian"])
    t = np.load(os.path.join(d, "hcn_hnc", "rtp_ts.npz"))
    assert reactions.verify_ts(t["numbers"], t["positions"], t["hessian"])["n_imaginary"] == 1


def test_a_saddle_optimised_as_a_reactant_is_refused(cache, tmp_path):
    """An optimiser kept in a symmetric start can stop on a saddle (it happened: a twisted vinyl
    alcohol). Its Hessian catches it: failure recorded, its label out of the data, no TS search."""
    d, _ = cache
    t = dict(np.load(os.path.join(d, "hcn_hnc", "rtp_ts.npz")))
    with pytest.raises(reactions.NotAMinimumError, match="1 imaginary"):
        reactions.verify_minimum(t["numbers"], t["positions"], t["hessian"])
    st = reactions.ReactionDir(str(tmp_path), reactions.read_reaction(HCN))
    np.savez(st.path("rtp_reactant.npz"), **{**t, "point": "reactant"})  # the saddle, labelled as the reactant
    assert not workflow.check_minimum(CFG, st, "reactant", t)
    assert sorted(os.listdir(st.dir)) == ["reactant_minimum.failed.json", "reactant_not_minimum_rtp.npz"]
    assert "1 imaginary" in st.failed("reactant_minimum")["reason"]
    r = dict(np.load(os.path.join(d, "hcn_hnc", "rtp_reactant.npz")))
    assert workflow.check_minimum(CFG, st, "product", r)  # a true minimum passes


def test_a_changed_reaction_file_does_not_reuse_its_cache(cache, tmp_path):
    d, _ = cache
    moved = dataclasses.replace(reactions.read_reaction(HCN), reactant=reactions.read_reaction(HCN).reactant + 0.05)
    st = reactions.ReactionDir(d, moved)
    with pytest.raises(ValueError, match="reaction file changed"):
        reactions.optimize_stage(CFG, st, "reactant")


def test_resume_recomputes_nothing(cache, monkeypatch):
    d, summary = cache
    mtimes = {f: os.path.getmtime(os.path.join(dp, f)) for dp, _, fs in os.walk(d) for f in fs if f.endswith(".npz")}

    def forbidden(*args, **kwargs):
        raise AssertionError("a cached calculation was recomputed")

    for mod, name in [(labels, "label_geometry"), (labels, "fd_hvp"), (structure, "optimize_geometry"),
                      (structure, "PySCFCalculator")]:  # fmt: skip
        monkeypatch.setattr(mod, name, forbidden)
    again = reactions.run(CFG, reactions.read_reactions([HCN]), d, progress=False)
    assert again["n_geometries"] == summary["n_geometries"]
    after = {f: os.path.getmtime(os.path.join(dp, f)) for dp, _, fs in os.walk(d) for f in fs if f.endswith(".npz")}
    assert after == mtimes


def test_resume_after_interruption(cache, tmp_path):
    """Delete the last labelled geometries (as if killed before them): only those are recomputed."""
    d, summary = cache
    removed = ["nms_ts_002.npz", "nms_product_002.npz"]
    copy = _copy_without(d, tmp_path, removed)
    before = {f: os.path.getmtime(os.path.join(copy, "hcn_hnc", f)) for f in os.listdir(os.path.join(copy, "hcn_hnc"))}
    again = reactions.run(CFG, reactions.read_reactions([HCN]), copy, progress=False)
    assert again["n_geometries"] == summary["n_geometries"]
    for f, t in before.items():
        if f.endswith(".npz"):
            assert os.path.getmtime(os.path.join(copy, "hcn_hnc", f)) == t, f
    a = np.load(os.path.join(d, "hcn_hnc", removed[0]))
    b = np.load(os.path.join(copy, "hcn_hnc", removed[0]))
    np.testing.assert_allclose(a["positions"], b["positions"], atol=1e-12)  # seeded: same geometry
    np.testing.assert_allclose(a["energy"], b["energy"], atol=1e-8)


def test_rounds_label_only_their_round_in_workers(cache, tmp_path):
    """`--rounds 2-2` with worker processes labels round 2 and nothing of round 1 (each worker
    must build the parent's task list; a worker holding another list runs other tasks)."""
    one, two = ["nms_ts_001.npz", "irc_reverse_01.npz"], ["nms_ts_002.npz", "nms_product_002.npz", "irc_forward_02.npz"]
    copy = _copy_without(cache[0], tmp_path, one + two)
    reactions.run(CFG, reactions.read_reactions([HCN]), copy, progress=False, workers=2, rounds=(2, 2))
    for f in two:
        assert os.path.exists(os.path.join(copy, "hcn_hnc", f)), f
    for f in one:
        assert not os.path.exists(os.path.join(copy, "hcn_hnc", f)), f


def test_rounds_argument_of_make_dataset():
    import argparse

    from script_loader import load_script

    parse = load_script("experiments", "make_dataset")._rounds
    assert parse("11-20") == (11, 20) and parse("7") == (7, 7)
    for bad in ("5-3", "0-2", "x", "3-"):
        with pytest.raises(argparse.ArgumentTypeError, match="FIRST-LAST"):
            parse(bad)


def test_a_killed_worker_process_is_replaced(cache, tmp_path, datagen_log):
    """A worker killed from outside (or by the OOM killer) breaks the pool: its task is logged and
    run again by new workers, and the run finishes with all the data."""
    import multiprocessing
    import signal
    import threading
    import time

    d, summary = cache
    copy = _copy_without(d, tmp_path, [f"nms_{point}_002.npz" for point in ("reactant", "product", "ts")])
    out = {}
    job = threading.Thread(target=lambda: out.update(s=reactions.run(CFG, reactions.read_reactions([HCN]), copy,
                                                                     progress=False, workers=2)))  # fmt: skip
    job.start()
    deadline = time.monotonic() + 120
    while not multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)
    job.join(300)
    assert any("worker process died" in m and "new workers take over" in m for m in datagen_log), datagen_log
    assert out["s"]["n_geometries"] == summary["n_geometries"]


def test_worker_processes_make_the_same_data(cache, tmp_path, datagen_log):
    """workers=2: spawned processes, each reaction's structure chain in order, labels two at a time.
    The data equal the one-process run's, and the workers' log records reach the parent's handlers."""
    d, summary = cache
    par = reactions.run(CFG, reactions.read_reactions([HCN]), str(tmp_path), progress=False, workers=2)
    assert par["reactions"]["hcn_hnc"]["failures"] == []
    for key in ("n_rtp", "n_irc", "n_nms"):
        assert par[key] == summary[key]

    def energies(cache_dir, category):
        recs = reactions.cached_records_of(os.path.join(cache_dir, "hcn_hnc"))
        return np.sort([float(r["energy"]) for r in recs if str(r["category"]) == category])

    # Same stationary points and the same IRC path. Which branch Sella calls "forward" follows the
    # sign of the TS mode, and NMS samples around linear HCN/HNC the basis of their degenerate
    # bends: both can change with the thread count, so those are compared as sets / counts.
    for category in ("rtp", "irc"):
        np.testing.assert_allclose(energies(str(tmp_path), category), energies(d, category), atol=1e-6)
    assert any(m.startswith("labelled hcn_hnc/nms_") for m in datagen_log), datagen_log[:5]
    assert not [f for _, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".tmp")]


def test_samples_drawn_with_rotation_like_modes_are_redrawn(cache, tmp_path, monkeypatch):
    """A cache from before the rotation-like-mode rule: where the rule freezes nothing the samples
    and their labels stay; where it freezes a mode they move to stale_* (out of the data, still in
    the compute time) and are drawn and labelled again."""
    from phljax.datagen.reactions import labelling

    d, summary = cache
    copy = str(tmp_path / "copy")
    shutil.copytree(d, copy)
    rdir = os.path.join(copy, "hcn_hnc")
    for point in ("reactant", "product", "ts"):  # as an older phljax wrote them
        f = os.path.join(rdir, f"nms_{point}_samples.npz")
        old = {k: v for k, v in np.load(f).items() if k not in ("frozen", "rectilinear_stretch")}
        np.savez(f, **old)
    reactant = np.load(os.path.join(rdir, "rtp_reactant.npz"))["positions"]
    real = labelling.rectilinear_stretch

    def reactant_turns(numbers, positions, modes, omega2, temperature):  # pretend its top mode turns
        out = real(numbers, positions, modes, omega2, temperature)
        if np.allclose(positions, reactant):
            out[-1] = 1.0
        return out

    monkeypatch.setattr(labelling, "rectilinear_stretch", reactant_turns)
    kept = {f: os.path.getmtime(os.path.join(rdir, f)) for f in ("nms_product_001.npz", "nms_ts_002.npz")}
    again = reactions.run(CFG, reactions.read_reactions([HCN]), copy, progress=False)

    assert again["n_nms"] == summary["n_nms"] and again["reactions"]["hcn_hnc"]["n_stale"] == CFG.n_nms
    assert again["compute_s"] > summary["compute_s"]  # the stale labels' time still counts
    assert list(again["reactions"]["hcn_hnc"]["nms_frozen_cm"]) == ["reactant"]
    new = np.load(os.path.join(rdir, "nms_reactant_samples.npz"))
    stale = np.load(os.path.join(rdir, "stale_nms_reactant_samples.npz"))
    assert new["frozen"][-1] and not new["frozen"][:-1].any()
    assert not np.allclose(new["positions"], stale["positions"])
    relabelled = np.load(os.path.join(rdir, "nms_reactant_001.npz"))
    np.testing.assert_allclose(relabelled["positions"], new["positions"][0])
    assert os.path.exists(os.path.join(rdir, "stale_nms_reactant_002.npz"))
    for f, t in kept.items():
        assert os.path.getmtime(os.path.join(rdir, f)) == t, f
    assert "frozen" in np.load(os.path.join(rdir, "nms_product_samples.npz"))


def test_changed_config_is_refused(cache):
    d, _ = cache
    with pytest.raises(ValueError, match="another configuration"):
        reactions.run(reactions.ReactionConfig(level=CHEAP, n_nms=3), reactions.read_reactions([HCN]), d)


def test_looser_hessian_checks_relabel_only_what_passes_them(cache, tmp_path, datagen_log):
    """The Hessian-check limits may be loosened on a cache: a geometry rejected by a check it now
    passes is labelled again (the same label), other rejections stay; tightening is refused."""
    d, summary = cache
    copy = _copy_without(d, tmp_path, [])
    rdir = os.path.join(copy, "hcn_hnc")
    checks = {"asym_abs": 0.0, "asym_rel": 2e-4, "sum_rule_abs": 0.0, "sum_rule_rel": 1e-3, "max_abs": 1.0}
    records = {  # as if rejected under max_asym_rel = 1e-4
        "nms_ts_002": {"reason": "Hessian not symmetric", "checks": checks},  # passes 1e-3
        "nms_product_002": {"reason": "Hessian not symmetric", "checks": {**checks, "asym_rel": 2e-3}},
        "nms_reactant_002": {"reason": "SCF not converged"},  # no Hessian, nothing to re-decide
    }
    for stem, record in records.items():
        positions = np.load(os.path.join(rdir, stem + ".npz"))["positions"]
        os.remove(os.path.join(rdir, stem + ".npz"))
        save_json(os.path.join(rdir, stem + ".rejected.json"), {"where": stem, "positions": positions, **record})
    save_json(os.path.join(copy, "config.json"), {**CFG.to_json(), "max_asym_rel": 1e-4})

    again = reactions.run(CFG, reactions.read_reactions([HCN]), copy, progress=False)
    assert again["n_geometries"] == summary["n_geometries"] - 2
    assert sorted(f for f in os.listdir(rdir) if f.endswith(".rejected.json")) == [
        "nms_product_002.rejected.json", "nms_reactant_002.rejected.json"]  # fmt: skip
    np.testing.assert_allclose(np.load(os.path.join(rdir, "nms_ts_002.npz"))["energy"],
                               np.load(os.path.join(d, "hcn_hnc", "nms_ts_002.npz"))["energy"], atol=1e-8)  # fmt: skip
    assert any("looser Hessian checks (max_asym_rel 0.0001 -> 0.001)" in m for m in datagen_log)
    assert reactions.ReactionConfig.from_json(load_json(os.path.join(copy, "config.json"))) == CFG
    # a share labelled on another machine is merged by copying files: its label beside the old
    # rejection record makes that record void
    shutil.copy(os.path.join(d, "hcn_hnc", "nms_product_002.npz"), rdir)
    assert not labels.passes_now(os.path.join(rdir, "nms_product_002"), 1.0, 1.0)
    assert workflow.summarize(copy)["reactions"]["hcn_hnc"]["rejected"] == ["nms_reactant_002: SCF not converged"]
    with pytest.raises(ValueError, match=r"looser Hessian checks than asked for \(max_asym_rel 0.001 -> 0.0001\)"):
        reactions.run(dataclasses.replace(CFG, max_asym_rel=1e-4), reactions.read_reactions([HCN]), copy)


def test_hdf5_round_trip(cache, tmp_path):
    d, summary = cache
    out = reactions.assemble(d, str(tmp_path), "tiny")
    assert set(out["files"]) == {"rtp", "irc", "nms"}
    counts = {}
    for cat in ("rtp", "irc", "nms"):
        mols = read_h5(tmp_path / f"tiny-{cat.upper()}.h5", require=("energies", "forces", "hessian"))
        counts[cat] = len(mols)
        for m in mols:
            assert m.meta["category"] == cat and m.meta["reaction"] == "hcn_hnc"
            assert m.hessian.shape == (3, 3, 3, 3)
            np.testing.assert_allclose(m.hessian.reshape(9, 9), m.hessian.reshape(9, 9).T, atol=1e-8)
    assert counts == {"rtp": 3, "irc": 2 * CFG.n_irc, "nms": 3 * CFG.n_nms}
    points = {m.meta["point"] for m in read_h5(tmp_path / "tiny-RTP.h5")}
    assert points == {"reactant", "product", "ts"}
    irc = np.load(os.path.join(d, "hcn_hnc", "irc.npz"))
    for m in read_h5(tmp_path / "tiny-IRC.h5"):  # which end each IRC branch leads to
        assert m.meta["toward"] == str(irc["end_" + m.meta["point"].removeprefix("irc_")])
    assert {m.meta["toward"] for m in read_h5(tmp_path / "tiny-IRC.h5")} == {"reactant", "product"}
    # energies and forces survive the unit round trip exactly (Hartree/Bohr in the cache)
    rec = np.load(os.path.join(d, "hcn_hnc", "rtp_ts.npz"))
    ts = [m for m in read_h5(tmp_path / "tiny-RTP.h5") if m.meta["point"] == "ts"][0]
    from phljax import units

    ha, bohr = units.HARTREE, units.BOHR
    np.testing.assert_allclose(ts.energy, float(rec["energy"]) * ha, rtol=1e-12)
    np.testing.assert_allclose(ts.forces, -rec["gradient"] * ha / bohr, rtol=1e-10, atol=1e-12)
    card = render_reaction_card(out, "tiny")
    assert "hcn_hnc" in card and "grid_response" not in card
    assert "(reaction set, hf/sto-3g)" in card and "Status: **complete**" in card  # every planned label is there
    partial = render_reaction_card({**out, "n_planned": out["n_planned"] + 1}, "tiny")
    assert f"PARTIAL: {out['n_geometries']} of {out['n_planned'] + 1} planned" in partial
    import pyscf

    assert f"PySCF {pyscf.__version__}, libxc " in card  # the versions that made the labels
    scan = {"command": "scan", "scans": [{"name": "H2O", "grid_level": 5, "num_probes": 2, "steps_A": [1e-3, 5e-3],
                                          "fd_rel_error": [5.6e-4, 5.3e-4]}]}  # fmt: skip
    grads = {"command": "grads", "gradients": [{"name": "H2O", "xc": "b3lyp", "grid_level": 5, "max_abs_gradient": 0.01,
             "error_default": 1.3e-5, "error_grid_response": 1.8e-6, "sum_of_gradients_default": 2e-6}]}  # fmt: skip
    card = render_reaction_card(out, "tiny", checks={"scans": scan, "gradients": grads})
    assert "| H2O | 5 | 5.6e-04 | 5.3e-04 |" in card and "| H2O | b3lyp | 5 | 1.0e-02 | 1.3e-05 | 1.8e-06 |" in card
    assert "grid_response" in card


def test_fd_hvp_matches_analytic_hessian():
    """Central differences of analytic gradients along probes vs the analytic Hessian (with dispersion)."""
    from ase.build import molecule

    level = dft.LevelOfTheory(xc="hf", basis="sto-3g", grid_level=0, conv_tol=1e-11, dispersion=True)
    a = molecule("H2CO")
    a.positions += np.random.default_rng(0).normal(0, 0.05, a.positions.shape)  # off the minimum
    probes = labels.make_probes("gaussian", 2, len(a), np.random.default_rng(1))
    out = dft.fd_hvp(a.numbers, a.positions, probes, level, step=5e-3)
    ref = dft.label_geometry(a.numbers, a.positions, level)
    exact = np.einsum("iajb,kjb->kia", ref["hessian"], probes)
    assert np.abs(out["hvps"] - exact).max() / np.abs(exact).max() < 1e-4
    np.testing.assert_allclose(out["gradient"], ref["gradient"], atol=1e-7)
    assert out["n_gradients"] == 5


def test_hvp_labels_round_trip(tmp_path):
    from ase.build import molecule

    a = molecule("H2O")
    probes = labels.make_probes("onehot", 3, len(a), np.random.default_rng(0))
    assert np.allclose((probes**2).sum((1, 2)), 9.0)  # sqrt(3N) e_c
    ref = dft.label_geometry(a.numbers, a.positions, CHEAP)
    stem = str(tmp_path / "w")
    extra = {"category": "nms", "reaction": "w", "point": "x", "index": 0, "source": "test"}
    assert labels.label_hvp(stem, a.numbers, a.positions, probes, CHEAP, extra, reference_hessian=ref["hessian"])
    rec = np.load(stem + ".npz")
    assert float(rec["fd_rel_error"]) < 1e-4
    mols = labels.to_molecules([dict(rec)])
    from phljax.data import write_h5

    write_h5(tmp_path / "w.h5", mols)
    (m,) = read_h5(tmp_path / "w.h5", require=("energies", "forces", "hvps"))
    assert m.hessian is None and m.hvps.shape == (3, 3, 3)
    np.testing.assert_allclose(m.hvp_probes, probes)
    np.testing.assert_allclose(m.hvps, mols[0].hvps, rtol=1e-12)


def test_unconverged_scf_is_rejected_not_written(tmp_path):
    from ase.build import molecule

    a = molecule("H2O")
    level = dft.LevelOfTheory(xc="hf", basis="sto-3g", grid_level=0, conv_tol=1e-14, max_cycle=1, dispersion=False)
    stem = str(tmp_path / "bad")
    assert not labels.label_hessian(stem, a.numbers, a.positions, level, {"category": "nms"})
    assert not os.path.exists(stem + ".npz") and os.path.exists(stem + ".rejected.json")
    assert labels.is_done(stem)


def test_bad_reaction_files_name_file_and_frame(tmp_path):
    good = open(HCN).read().splitlines()
    p = tmp_path / "swapped.xyz"
    lines = list(good)
    lines[7], lines[8] = lines[8], lines[7]  # product atoms in another order
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(reactions.ReactionFileError, match=r"swapped\.xyz: frame 1 .* mapped"):
        reactions.read_reaction(str(p))
    one = tmp_path / "one.xyz"
    one.write_text("\n".join(good[:5]) + "\n")
    with pytest.raises(reactions.ReactionFileError, match=r"one\.xyz: expected 2 frames"):
        reactions.read_reaction(str(one))
    charged = tmp_path / "charged.xyz"
    charged.write_text("\n".join(good).replace("charge=0", "charge=1") + "\n")
    with pytest.raises(reactions.ReactionFileError, match="charge=1"):
        reactions.read_reaction(str(charged))


def test_bundled_reaction_files_are_mapped():
    """Every shipped reaction reads, and reactant and product differ (bonds or conformation)."""
    import glob

    rx = reactions.read_reactions(sorted(glob.glob(os.path.join(ROOT, "data", "reactions", "*.xyz"))))
    assert len(rx) >= 10
    for r in rx:
        assert set(r.numbers.tolist()) <= {1, 6, 7, 8}
        assert reactions.aligned_rmsd(r.reactant, r.product) > 0.2, r.id


def test_endpoint_matching_by_bonds_and_rmsd():
    numbers = np.array([1, 6, 7])
    hcn = np.array([[0, 0, -1.07], [0, 0, 0], [0, 0, 1.16]])
    hnc = np.array([[0, 0, 2.17], [0, 0, 0], [0, 0, 1.17]])
    assert reactions.match_endpoint(numbers, hcn + 0.01, hcn, hnc) == "reactant"
    assert reactions.match_endpoint(numbers, hnc, hcn, hnc) == "product"
    assert reactions.match_endpoint(numbers, np.array([[0, 0, 5.0], [0, 0, 0], [0, 0, 1.16]]), hcn, hnc) is None
    idx = reactions.irc_points(np.linspace(0, 1, 11)[:, None, None] * np.ones((1, 3, 3)), 4)
    assert idx.tolist() == [3, 5, 8, 10] or len(idx) == 4


def test_hvp_mode_stationary_point_is_validated(tmp_path):
    """--labels hvp: a stationary point gets a helper analytic Hessian and FD-HVP data labels
    checked against it; the data record carries probes and HVPs, not the Hessian."""
    cfg = reactions.ReactionConfig(level=CHEAP, labels="hvp", num_probes=2, probe_kind="onehot")
    rx = reactions.read_reaction(HCN)
    st = reactions.ReactionDir(str(tmp_path), rx)
    reactions.stationary_hessian(cfg, st, "reactant", rx.reactant)
    helper = np.load(st.path("hess_reactant.npz"))
    data = np.load(st.path("rtp_reactant.npz"))
    assert "hessian" in helper.files and "hessian" not in data.files
    assert data["hvps"].shape == (2, 3, 3) and float(data["fd_rel_error"]) < 1e-3  # O(h^2), h = 5e-3 A
    assert str(data["category"]) == "rtp" and str(data["point"]) == "reactant"
    (rec,) = list(reactions.cached_records_of(st.dir))
    assert str(rec["labels"]) == "hvp"


def test_label_rounds_cover_every_category(tmp_path):
    """After the structure work, round k labels IRC point k and NMS sample k of every reaction, so
    a run stopped early has all three categories (the order only; nothing is computed here)."""
    rx = reactions.read_reaction(HCN)
    other = dataclasses.replace(rx, id="hcn_hnc_copy")
    names = [t.description for t in reactions.tasks(CFG, [rx, other], str(tmp_path))]
    structure_work = 2 * 6  # optimise and label reactant and product, TS, IRC
    first_round = names[structure_work : structure_work + 2 * 5]
    assert first_round[:5] == [
        "hcn_hnc: IRC forward point 1", "hcn_hnc: IRC reverse point 1",
        "hcn_hnc: NMS reactant 1", "hcn_hnc: NMS product 1", "hcn_hnc: NMS ts 1",
    ]  # fmt: skip
    assert first_round[5].startswith("hcn_hnc_copy: IRC forward point 1")
    assert len(names) == structure_work + 2 * (2 * CFG.n_irc + 3 * CFG.n_nms)

    # rounds=(first, last) keeps the structure work and only those label rounds, in the same order
    last = max(CFG.n_irc, CFG.n_nms)
    late = [t.description for t in reactions.tasks(CFG, [rx, other], str(tmp_path), rounds=(2, last))]
    assert late[:structure_work] == names[:structure_work]
    assert late[structure_work:] == names[structure_work + 2 * 5 :]
    with pytest.raises(ValueError, match="rounds"):
        reactions.run(CFG, [rx], str(tmp_path), progress=False, rounds=(2, 1))


@pytest.mark.parametrize("workers", [1, 2])
def test_stop_file_ends_the_run_before_the_next_task(tmp_path, workers):
    """`touch <cache>/STOP` stops a long run cleanly: no task starts, the file is consumed."""
    d = str(tmp_path / "cache")
    os.makedirs(d)
    open(os.path.join(d, "STOP"), "w").close()
    summary = reactions.run(CFG, reactions.read_reactions([HCN]), d, progress=False, workers=workers)
    assert summary["n_geometries"] == 0 and not os.path.exists(os.path.join(d, "STOP"))
    assert os.listdir(os.path.join(d, "hcn_hnc")) == []


def test_bundled_reaction_data_reads_with_its_categories():
    """The shipped RTP/IRC/NMS files (run.py's default data) read through phljax's reader, each
    geometry carrying its file's category, a known reaction and a finite Hessian; together they
    hold the issue's 800 geometries or more."""
    import glob

    from phljax.data import bundled_path

    xyz = glob.glob(os.path.join(ROOT, "data", "reactions", "*.xyz"))
    known = {os.path.splitext(os.path.basename(p))[0] for p in xyz}
    total = 0
    for cat in ("RTP", "IRC", "NMS"):
        path = bundled_path(f"chon_reactions-{cat}.h5")
        mols = read_h5(path)
        total += len(mols)
        assert mols, path
        for m in mols:
            assert m.meta["category"] == cat.lower() and m.meta["reaction"] in known
            n = m.n_atoms
            assert m.hessian.shape == (n, 3, n, 3) and np.isfinite(m.hessian).all()
            assert cat != "IRC" or m.meta["toward"] in ("reactant", "product")
    assert total >= 800


def test_one_command_regenerates_one_reaction(tmp_path):
    """The README's command for one reaction, at a cheap level and with two worker processes
    (spawned from the script as __main__): three HDF5 files and a complete data card."""
    import subprocess
    import sys
    import tarfile

    out = tmp_path / "hcn"
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "make_dataset.py"), "--reactions", HCN,
           "--out", str(out), "--cache", str(out / "cache"), "--xc", "hf", "--basis", "sto-3g", "--grid-level", "0",
           "--no-dispersion", "--n-irc", "1", "--n-nms", "1", "--workers", "2", "--no-progress"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "2"}, timeout=900)
    counts = {cat: len(read_h5(out / f"chon_reactions-{cat}.h5")) for cat in ("RTP", "IRC", "NMS")}
    assert counts == {"RTP": 3, "IRC": 2, "NMS": 3}
    card = (out / "chon_reactions.DATA_CARD.md").read_text()
    assert "Status: **complete**" in card and "hcn_hnc" in card

    # experiments/label_rounds.sh (a second machine's share): it labels round 1 again once its
    # files are gone, stops, and packs exactly those files to be merged back
    rxn_dir = out / "cache" / "hcn_hnc"
    made = sorted(p.name for pat in ("irc_*_[0-9][0-9].npz", "nms_*_[0-9][0-9][0-9].npz") for p in rxn_dir.glob(pat))
    assert len(made) == 2 + 3
    for name in made:
        (rxn_dir / name).unlink()
    tar = tmp_path / "share" / "labels.tar"
    script = os.path.join(ROOT, "experiments", "label_rounds.sh")
    options = [f"--cache={out / 'cache'}" if a == "--cache" else a for a in cmd[2:-3] if a != str(out / "cache")]
    subprocess.run(["bash", script, "1", "600", "2", str(tar), *options], check=True, capture_output=True,
                   env={**os.environ, "PYTHON": sys.executable}, timeout=900)  # fmt: skip
    with tarfile.open(tar) as f:
        assert sorted(os.path.basename(n) for n in f.getnames()) == made
    assert (tmp_path / "share" / "labels.log").read_text().count(" labelled ") == len(made)
