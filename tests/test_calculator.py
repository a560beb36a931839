"""`phljax.calculator.PHLCalculator` (ASE) and the TS search benchmark `phljax.ts_search`.

The calculator's energy, forces and Hessian are checked against central finite differences of
each other in float64, its Hessian against ASE's own finite-difference `Vibrations`, a repeated
Hessian must not trace again, and Sella must run on it. The TS search runs on one reaction with
the tiny model and a 5-step cap: the records, the tables and resuming are checked, not chemistry.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import chex
import jax
import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.vibrations import Vibrations
from script_loader import load_script

from phljax import ts_search
from phljax import vibrations as vib
from phljax.calculator import PHLCalculator
from phljax.optional import import_sella


@pytest.fixture(scope="module")
def calc(trained):
    config, _, _, _ = trained
    return PHLCalculator.from_workdir(config.workdir)


def _atoms(m, calc) -> Atoms:
    atoms = Atoms(numbers=m.numbers, positions=m.positions)
    atoms.calc = calc
    return atoms


def test_energy_forces_and_hessian_agree_with_finite_differences(calc, molecules):
    """float64, step 1e-4 A: F = -dE/dR and H = -dF/dR by central differences (truncation
    ~ step^2/6 |d3E| ~ 1e-7, rounding ~ 1e-16 |E| / step ~ 1e-11); H symmetric; cached results."""
    atoms = _atoms(molecules[1], calc)  # H2O (the size bucket of the TS-search test's HCN)
    n = len(atoms)
    e, f = atoms.get_potential_energy(), atoms.get_forces()
    h = calc.get_hessian(atoms)
    assert isinstance(e, float) and f.dtype == np.float64 and f.shape == (n, 3)
    assert h.dtype == np.float64 and h.shape == (3 * n, 3 * n)
    np.testing.assert_array_equal(h, h.T)
    assert calc.get_property("free_energy", atoms) == e
    counts = dict(calc.counts)
    np.testing.assert_array_equal(calc.get_property("hessian", atoms), h)  # cached: nothing recomputed
    np.testing.assert_array_equal(calc.get_hessian(), h)  # the last atoms
    assert calc.counts == counts
    step = 1e-4
    fd_f, fd_h = np.zeros(3 * n), np.zeros((3 * n, 3 * n))
    r0 = atoms.positions.copy()
    for c in range(3 * n):
        d = np.zeros(3 * n)
        d[c] = step
        values = []
        for sign in (1, -1):
            atoms.positions = r0 + sign * d.reshape(n, 3)
            values.append((atoms.get_potential_energy(), atoms.get_forces().ravel()))
        (ep, fp), (em, fm) = values
        fd_f[c] = -(ep - em) / (2 * step)
        fd_h[:, c] = -(fp - fm) / (2 * step)
    atoms.positions = r0
    chex.assert_trees_all_close(f.ravel(), fd_f, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(h, fd_h, atol=1e-6, rtol=1e-5)
    assert np.abs(h).max() > 1e-2  # a Hessian that is not (near) zero, so the comparison means something


def test_repeated_hessian_does_not_recompile_and_its_time_at_12_atoms(calc):
    """Isopropanol (C3H8O, 12 atoms, every pair within the cutoff: one size bucket however it is
    distorted): after the first call, new geometries reuse the compiled programs."""
    atoms = molecule("C2H6CHOH")
    rng = np.random.default_rng(0)
    atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
    atoms.calc = calc
    assert len(atoms) == 12
    h0 = calc.get_hessian(atoms)  # compiles energy-forces and Hessian programs for this bucket
    first = calc.potential.compilations
    times = []
    for _ in range(5):
        atoms.positions += rng.normal(scale=0.01, size=atoms.positions.shape)
        t0 = time.perf_counter()
        h = calc.get_hessian(atoms)  # a new geometry: energy, forces and Hessian again
        times.append(time.perf_counter() - t0)
    assert calc.potential.compilations == first
    assert h.shape == (36, 36) and not np.allclose(h, h0)
    t0 = time.perf_counter()
    calc.potential.hessian(atoms.numbers, atoms.positions, dtype=np.float64)
    alone = time.perf_counter() - t0
    print(
        f"\nget_hessian, 12 atoms, float64, new geometry (energy + forces + Hessian): "
        f"median {np.median(times) * 1e3:.1f} ms "
        f"(min {min(times) * 1e3:.1f}); Potential.hessian alone {alone * 1e3:.1f} ms; tiny test model, XLA -O0, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )


def test_sella_runs_on_the_model_hessian(calc, molecules):
    sella = import_sella()
    atoms = _atoms(molecules[2], calc)
    n_hessians = calc.counts["hessian"]
    with jax.enable_x64(True):
        opt = sella.Sella(atoms, order=1, internal=True, hessian_function=calc.get_hessian, logfile=None)
        opt.run(fmax=1e-6, steps=3)  # cannot converge: it must take the 3 steps
    assert opt.nsteps == 3
    assert calc.counts["hessian"] > n_hessians  # Sella's initial Hessian came from the model
    assert np.all(np.isfinite(atoms.positions)) and np.isfinite(atoms.get_potential_energy())
    assert not np.allclose(atoms.positions, molecules[2].positions)


def test_ase_vibrations_converge_to_the_analytic_hessian(calc, molecules, tmp_path):
    """ASE's central-difference `Vibrations` on the calculator against `harmonic_analysis` of the
    analytic Hessian, both unprojected (all 3N modes, at a non-stationary point).

    Central differences of forces err by (delta^2 / 6) d3F + O(delta^4): halving delta must cut the
    difference to the analytic Hessian about fourfold (3-5x; a wrong analytic Hessian would leave a
    floor that does not shrink), and at delta = 1e-3 A it is below 1e-5 relative. By Weyl's inequality
    each mass-weighted eigenvalue then moves by at most the spectral norm of the mass-weighted
    difference, which bounds the frequencies nu = sign(lambda) sqrt|lambda| CM1: the bound holds
    only if ASE and phljax agree on masses, units, ordering and the sign of imaginary modes.
    """
    atoms = _atoms(molecules[1], calc)  # H2O, distorted
    h = calc.get_hessian(atoms)
    masses = atoms.get_masses()
    errors, data = {}, {}
    for delta in (2e-3, 1e-3):
        vibrations = Vibrations(atoms, name=str(tmp_path / f"vib-{delta}"), delta=delta, nfree=2)
        vibrations.run()
        data[delta] = vibrations.get_vibrations()
        errors[delta] = np.abs(data[delta].get_hessian_2d() - h).max()
    assert 3.0 < errors[2e-3] / errors[1e-3] < 5.0, errors
    # Richardson: (4 H(delta) - H(2 delta)) / 3 cancels the delta^2 term; what is left, O(delta^4) and
    # rounding, is far below the delta^2 error. A wrong analytic Hessian would stay as the residual.
    extrapolated = (4 * data[1e-3].get_hessian_2d() - data[2e-3].get_hessian_2d()) / 3
    residual = np.abs(extrapolated - h).max()
    print(f"\nFD Hessian error: {errors}, after Richardson {residual:.2e}, max|H| {np.abs(h).max():.3g}")
    assert residual < 1e-3 * errors[1e-3], (residual, errors)

    ours = vib.harmonic_analysis(atoms.numbers, atoms.positions, h, masses=masses, project=False)
    freq_ase = data[1e-3].get_frequencies()  # [3N] complex cm^-1, imaginary for negative eigenvalues
    nu_ase = freq_ase.real - np.abs(freq_ase.imag)  # the phljax convention: imaginary as negative
    diff_mw = vib.mass_weighted_hessian(data[1e-3].get_hessian_2d(), masses) - vib.mass_weighted_hessian(h, masses)
    weyl = np.linalg.norm(diff_mw, 2)  # eV/A^2/amu
    lam_ours, lam_ase = np.sign(ours.frequencies) * ours.frequencies**2, np.sign(nu_ase) * nu_ase**2  # cm^-2
    assert np.all(np.abs(lam_ours - lam_ase) <= weyl * vib.CM1**2 * (1 + 1e-9) + 1e-9), (ours.frequencies, nu_ase)
    clear = np.abs(ours.frequencies) > 100  # cm^-1, away from zero: |d nu| <= CM1^2 |d lambda| / |nu|
    assert clear.sum() >= 3
    bound = weyl * vib.CM1**2 / np.abs(ours.frequencies[clear])
    assert bound.max() < 0.05  # cm^-1: the comparison is tight
    assert np.all(np.abs(ours.frequencies[clear] - nu_ase[clear]) <= bound)


def test_bad_molecules_and_options_are_refused(calc, molecules):
    m = molecules[0]
    atoms = _atoms(m, calc)
    atoms.pbc = [True, False, False]
    atoms.cell = [10.0, 10.0, 10.0]
    with pytest.raises(ValueError, match=r"molecules only; got pbc=\[True, False, False\]"):
        atoms.get_potential_energy()
    fluorine = Atoms(numbers=[9, 1, 1], positions=m.positions, calculator=calc)
    with pytest.raises(ValueError, match=r"element\(s\) \[9\] of H2F not in the model's elements \[1, 6, 7, 8\]"):
        calc.get_hessian(fluorine)
    bad = _atoms(m, calc)
    bad.positions[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"positions of atom\(s\) \[1\] are not finite"):
        bad.get_forces()
    with pytest.raises(ValueError, match="PHLCalculator has no atoms"):
        PHLCalculator(calc.potential).get_hessian()
    with pytest.raises(ValueError, match="dtype must be float32 or float64"):
        PHLCalculator(calc.potential, dtype=np.int32)


def test_float32_energies_and_forces_are_close_to_float64(calc, molecules):
    atoms = _atoms(molecules[0], PHLCalculator(calc.potential, dtype=np.float32))
    e32, f32 = atoms.get_potential_energy(), atoms.get_forces()
    e64, f64 = calc.potential.energy_and_forces(atoms.numbers, atoms.positions, dtype=np.float64)
    assert abs(e32 - e64) < 1e-4 * max(1.0, abs(e64))
    np.testing.assert_allclose(f32, f64, atol=1e-4)
    assert atoms.calc.get_hessian(atoms).dtype == np.float64


# --- the TS search benchmark --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hcn():
    (ref,) = ts_search.load_references(reactions=["hcn_hnc"])
    return ref


def test_starts_are_seeded_and_sized(hcn):
    settings = ts_search.Settings(perturbations=3, seed=1)
    starts = ts_search.make_starts(hcn, settings)
    assert [s.name for s in starts] == ["guess", "perturbed-0", "perturbed-1", "perturbed-2"]
    assert starts[0].source.endswith("hcn_hnc/neb.npz guess") and starts[0].rmsd < 0.05
    # translations and rotations projected out: the aligned RMSD is the requested RMS (to first order)
    np.testing.assert_allclose([s.rmsd for s in starts[1:]], [0.1, 0.2, 0.3], rtol=0.05)
    again = ts_search.make_starts(hcn, settings)
    np.testing.assert_array_equal(starts[2].positions, again[2].positions)
    other = ts_search.make_starts(hcn, ts_search.Settings(perturbations=3, seed=2))
    assert not np.allclose(starts[2].positions, other[2].positions)
    climbing = ts_search.make_starts(hcn, ts_search.Settings(guess="climbing", perturbations=0))
    assert len(climbing) == 1 and climbing[0].source.endswith("neb.npz climbing")
    (h2co,) = ts_search.load_references(reactions=["h2co_h2_co"])  # a TS frame in the reaction file: no NEB
    assert h2co.guess_source["pipeline"].endswith("h2co_h2_co.xyz frame 2")
    with pytest.raises(ValueError, match=r"reaction\(s\) \['nope'\] have no TS"):
        ts_search.load_references(reactions=["nope"])
    with pytest.raises(ValueError, match="rms_range"):
        ts_search.Settings(rms_range=(0.3, 0.1))


def test_ts_search_records_tables_and_resume(trained, hcn, tmp_path, monkeypatch):
    """The CLI on a one-scheme study root (the tiny model as an E-F-HVP random run), HCN -> HNC,
    a 5-step cap: 1 guess + 1 perturbed start x 2 Hessian modes; then resuming runs nothing."""
    config, _, _, _ = trained
    root = tmp_path / "study"
    (root / "random").mkdir(parents=True)
    os.symlink(config.workdir, root / "random" / "efhvp-random-randomized-s0")
    (root / "random" / "efh-s0").mkdir()  # unfinished (no results.json): not taken
    shutil.copy(os.path.join(config.workdir, "config.json"), root / "random" / "efh-s0")
    out = str(tmp_path / "ts")
    argv = ["--study-root", str(root), "--protocol", "random", "--seed", "0", "--reactions", "hcn_hnc"]
    argv += ["--max-steps", "5", "--perturbations", "1", "--irc-steps", "3", "--max-wall", "60", "--out", out]
    cli = load_script("experiments", "ts_search")
    cli.main(argv)

    records = ts_search.read_attempts(out)
    assert sorted((r["start"], r["mode"]) for r in records) == [
        ("guess", "model"), ("guess", "sella"), ("perturbed-0", "model"), ("perturbed-0", "sella"),
    ]  # fmt: skip
    for r in records:
        assert r["model"] == os.path.realpath(config.workdir) and r["label"] == "E-F-HVP random (randomized)"
        assert r["reaction"] == "hcn_hnc" and r["status"] in ("converged", "not_converged", "timeout", "error")
        assert 0 <= r["steps"] <= 5 and r["wall_s"] > 0 and r["n_force_calls"] >= 1
        assert r["success"] == (r["converged"] and r["one_imaginary"] and r["rmsd_ok"] and r["irc_connects"])
        if r["status"] in ("converged", "not_converged"):  # the search ran to its end: the saddle is analysed
            assert isinstance(r["n_imaginary"], int) and r["one_imaginary"] == (r["n_imaginary"] == 1)
            assert r["rmsd"] >= 0 and r["rmsd_ok"] == (r["rmsd"] < 0.1) and np.shape(r["ts"]) == (3, 3)
            assert len(r["frequencies_cm"]) == 2 and np.isfinite(r["fmax_final"])
            # the model's Hessian at the start and after every step (diag_every_n=-1); none in Sella's mode
            assert r["n_hessians"] >= r["steps"] + 1 if r["mode"] == "model" else r["n_hessians"] == 0
        if r["irc"] is not None:
            assert set(r["irc"]) == {"forward", "reverse"}
            assert all(b["end"] in ("reactant", "product", None) for b in r["irc"].values())
    finished = {r["mode"] for r in records if r["status"] in ("converged", "not_converged")}
    assert finished == set(ts_search.MODES), [(r["mode"], r["status"], r["error"]) for r in records]
    guess = next(r for r in records if r["start"] == "guess")
    assert guess["start_rmsd"] < 0.05
    assert abs(next(r for r in records if r["start"] == "perturbed-0")["start_rmsd"] - 0.2) < 0.01

    with open(os.path.join(out, "ts_search.md")) as f:
        tables = f.read()
    assert "## TS search: random protocol, seed 0" in tables
    header = "| scheme | guess, model H | guess, Sella H | perturbed, model H | perturbed, Sella H |"
    assert header in tables
    row = next(line for line in tables.splitlines() if line.startswith("| E-F-HVP random (randomized) |"))
    assert row.count("(") == 1 + 4 and "/1)" in row  # the label's regime, and k/1 per column
    assert "### E-F-HVP random (randomized)" in tables
    with open(os.path.join(out, "ts_search.json")) as f:
        doc = json.load(f)
    assert len(doc["attempts"]) == 4 and doc["settings"]["max_steps"] == 5
    summary = doc["summary"]["E-F-HVP random (randomized)"]
    cells = {f"{kind}/{mode}" for kind in ("guess", "perturbed") for mode in ts_search.MODES}
    assert {k: v["n"] for k, v in summary.items()} == dict.fromkeys(cells, 1)

    # resume: every attempt is done, nothing runs (a torn last line from a kill mid-write is skipped)
    with open(os.path.join(out, "attempts.jsonl"), "a") as f:
        f.write('{"model": "x", "reac')
    assert len(ts_search.read_attempts(out)) == 4

    def no_attempt(*args, **kwargs):
        raise AssertionError("a finished attempt ran again")

    monkeypatch.setattr(ts_search.benchmark, "run_attempt", no_attempt)  # where run_benchmark looks it up
    cli.main(argv)
    settings = ts_search.Settings(**{**doc["settings"], "rms_range": tuple(doc["settings"]["rms_range"])})
    model = ts_search.model_from_workdir(config.workdir)
    again = ts_search.run_benchmark([model], settings, out, references=[hcn])
    assert again["E-F-HVP random (randomized)"] == summary
    with pytest.raises(ValueError, match="other settings"):
        ts_search.run_benchmark([model], ts_search.Settings(max_steps=6), out, references=[hcn])
