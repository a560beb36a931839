"""Training: checkpoints, resume, the CLI for the four schemes, fixed and data probes, learning."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, SUBPROCESS_ENV, TINY, cli_args, count_traces

import phljax
from phljax.data import Molecule
from phljax.train.loop import initial_record
from phljax.train.optim import continue_warmup, learning_rate_scale, replay_schedule
from phljax.units import KCAL_MOL


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _template(run, config):
    """A state record with the structure `phljax.train` checkpoints."""
    return initial_record(run, run.optimizer())


def _assert_trees_equal(a, b, rtol=0.0):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_allclose(x, y, rtol=rtol, atol=0)


def test_checkpoint_round_trip(run, tiny_config, tmp_path):
    record = _template(run, tiny_config)
    record["state"]["step"] = jnp.int32(7)
    ckpt = phljax.Checkpointer(str(tmp_path))
    assert ckpt.restore_latest(record) is None and ckpt.restore_best(record) is None  # nothing saved yet
    ckpt.save(1, record, is_best=True)
    later = jax.tree.map(lambda x: x + 1 if np.issubdtype(np.asarray(x).dtype, np.floating) else x, record)
    later["epoch"] = np.array(2, np.int32)
    ckpt.save(2, later, is_best=False)
    ckpt.close()

    again = phljax.Checkpointer(str(tmp_path))  # a new process would start like this
    _assert_trees_equal(again.restore_latest(record), jax.device_get(later))
    _assert_trees_equal(again.restore_best(record), jax.device_get(record))
    again.close()


def test_resume_continues_and_matches_an_uninterrupted_run(trained, tmp_path):
    config, _, traces_first, _ = trained
    resumed = config.replace(workdir=str(tmp_path / "resumed"), epochs=3)
    shutil.copytree(config.workdir, resumed.workdir)  # the workdir may change on resume, the settings may not
    first_two = _metrics(resumed.workdir)
    assert [m["epoch"] for m in first_two] == [1, 2]

    run = phljax.prepare(resumed)
    counter = count_traces(run)
    phljax.train(resumed, run)
    lines = _metrics(resumed.workdir)
    assert [m["epoch"] for m in lines] == [1, 2, 3]  # continued at epoch 3, did not start over
    assert lines[:2] == first_two
    assert lines[2]["step"] == 3 * run.steps_per_epoch
    assert counter["n"] == traces_first  # as many traces for one epoch as for two

    straight = config.replace(workdir=str(tmp_path / "straight"), epochs=3)
    run3 = phljax.prepare(straight)
    counter3 = count_traces(run3)
    phljax.train(straight, run3)
    assert counter3["n"] == traces_first
    reference = _metrics(straight.workdir)
    for key in ("step", "train_loss", "train_hessian_loss", "val_loss"):
        np.testing.assert_allclose([m[key] for m in lines], [m[key] for m in reference], rtol=1e-6)

    template = _template(run, resumed)
    a = phljax.Checkpointer(resumed.workdir).restore_latest(template)
    b = phljax.Checkpointer(straight.workdir).restore_latest(template)
    assert int(a["epoch"]) == int(b["epoch"]) == 3
    _assert_trees_equal(a["state"], b["state"], rtol=1e-6)


def test_resume_refuses_a_different_config(trained, tmp_path):
    config, _, _, _ = trained
    other = config.replace(workdir=str(tmp_path / "other"), learning_rate=1e-2)
    shutil.copytree(config.workdir, other.workdir)
    with pytest.raises(ValueError, match=r"different config \(\['learning_rate'\]\)"):
        phljax.train(other)


def test_training_lowers_the_loss(trained, tmp_path):
    config, after_two_epochs, _, _ = trained
    config = config.replace(workdir=str(tmp_path / "learn"), epochs=12)  # 36 Adam steps at the default rate
    results = phljax.train(config)
    lines = _metrics(config.workdir)
    assert len(lines) == 12 and lines[-1]["step"] == 36
    val = [m["val_loss"] for m in lines]
    assert all(b < a for a, b in zip(val, val[1:], strict=False)), val  # every epoch improves on held-out data
    assert val[-1] < 0.6 * val[0] and lines[-1]["train_loss"] < 0.6 * lines[0]["train_loss"]
    assert lines[-1]["train_force_loss"] < 0.6 * lines[0]["train_force_loss"]
    for key in ("energy_rmse", "forces_rmse"):  # test errors below those after 2 epochs
        assert results["errors_ev"]["test"][key] < after_two_epochs["errors_ev"]["test"][key]


# -- the command line -----------------------------------------------------------------------------------

CLI_RUNS = {
    "none": ["--probe=none"],
    "onehot": ["--probe=onehot", "--probe-mode=fixed"],  # fixed probes: one per molecule for the run
    "random": ["--probe=random"],
    "full": ["--probe=full"],
    "data": ["--probe=random", "--probe-mode=data"],  # stored probes and HVPs, no Hessians
}


@pytest.fixture(scope="module")
def hvp_file(molecules, tmp_path_factory):
    """The synthetic molecules with one stored Gaussian probe and its exact H v each, no Hessian."""
    rng = np.random.default_rng(0)
    mols = []
    for m in molecules:
        v = rng.normal(size=(1, m.n_atoms, 3))
        hv = np.einsum("iajb,kjb->kia", m.hessian, v)
        mols.append(Molecule(m.numbers, m.positions, m.energy, m.forces, None, v, hv, meta=dict(m.meta)))
    path = tmp_path_factory.mktemp("hvp") / "hvps.h5"
    phljax.write_h5(path, mols)
    return str(path)


@pytest.fixture(scope="module")
def cli(h5_path, hvp_file, tmp_path_factory, trained):
    """{name: (workdir, stdout)} of experiments/run.py for every entry of CLI_RUNS.

    'random' is the `trained` run (the same script, run in-process); the others run as
    subprocesses, all at once (compiling is single-threaded).
    """
    root = tmp_path_factory.mktemp("cli")

    def launch(name):
        workdir = str(root / name)
        cmd = [
            sys.executable,
            "experiments/run.py",
            *cli_args(CLI_RUNS[name], hvp_file if name == "data" else h5_path, workdir),
        ]
        proc = subprocess.run(cmd, cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
        return workdir, proc.stdout

    names = [name for name in CLI_RUNS if name != "random"]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(names)) as pool:
        runs = dict(zip(names, pool.map(launch, names), strict=True))
    config, _, _, stdout = trained
    return {**runs, "random": (config.workdir, stdout)}


@pytest.mark.parametrize("name", ["none", "onehot", "random", "full"])
def test_cli_scheme(cli, name):
    workdir, stdout = cli[name]
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    probe = CLI_RUNS[name][0].split("=")[1]
    assert results["scheme"] == phljax.SCHEMES[probe]
    assert results["config"]["probe"] == probe and results["config"]["channels"] == TINY["channels"]
    assert results["config"]["probe_mode"] == ("fixed" if "--probe-mode=fixed" in CLI_RUNS[name] else "randomized")
    assert results["epochs_run"] == 2
    test = results["errors_ev"]["test"]
    assert test["n_molecules"] == results["n_molecules"]["test"] > 0
    for q in ("energy", "forces", "hessian"):
        for stat in ("mae", "rmse"):
            assert np.isfinite(test[f"{q}_{stat}"]) and test[f"{q}_{stat}"] > 0
            kcal = results["errors_kcal_mol"]["test"][f"{q}_{stat}"]
            np.testing.assert_allclose(kcal, test[f"{q}_{stat}"] / KCAL_MOL, rtol=1e-12)
        assert test[f"{q}_mae"] <= test[f"{q}_rmse"]
    # the printed table: the scheme, then one row per quantity with eV and kcal/mol units
    assert phljax.SCHEMES[probe] in stdout
    for q, unit in (("energy", "kcal/mol"), ("forces", "kcal/mol/A"), ("hessian", "kcal/mol/A^2")):
        (row,) = [line for line in stdout.splitlines() if line.split()[:2] == ["test", q]]
        assert row.rstrip().endswith(unit)
        assert f"{test[f'{q}_mae']:.4g}" in row
    lines = _metrics(workdir)
    assert [m["epoch"] for m in lines] == [1, 2]
    curvature = [m["train_hessian_loss"] for m in lines]
    assert all(c == 0 for c in curvature) if probe == "none" else all(c > 0 for c in curvature)


def test_cli_data_probes_without_hessians(cli, hvp_file, tiny_config):
    workdir, stdout = cli["data"]
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    assert results["scheme"] == "E-F-HVP random" and results["config"]["probe_mode"] == "data"
    test = results["errors_ev"]["test"]
    assert test["energy_rmse"] > 0 and test["forces_rmse"] > 0
    assert "hessian_rmse" not in test  # no reference Hessians to compare with
    assert all(m["train_hessian_loss"] > 0 for m in _metrics(workdir))  # the stored HVPs are supervised
    assert "hessian" not in stdout.split("E-F-HVP random")[-1]

    # the same file cannot train with drawn probes: that needs reference Hessians
    with pytest.raises(ValueError, match=r"hvps\.h5:/.*needs reference Hessians.*--probe-mode=data"):
        phljax.prepare(tiny_config.replace(data=(hvp_file,), probe_mode="randomized"))


def test_run_without_data_trains_on_the_bundled_reaction_set(tmp_path):
    """`experiments/run.py` with no --data trains on the bundled RTP, IRC and NMS files and reports
    test errors per category, in the paper's order (1 epoch of the tiny model)."""
    from phljax.data import DEFAULT_DATA, default_data, read_h5

    n_files = {name: len(read_h5(path)) for name, path in zip(DEFAULT_DATA, default_data(), strict=True)}
    assert list(n_files) == ["chon_reactions-RTP.h5", "chon_reactions-IRC.h5", "chon_reactions-NMS.h5"]
    workdir = str(tmp_path / "run")
    cmd = [sys.executable, "experiments/run.py", *cli_args(["--probe=random"], None, workdir, epochs=1, batch_size=32)]
    proc = subprocess.run(cmd, cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    assert results["config"]["data"] == []
    assert sum(results["n_molecules"].values()) == sum(n_files.values())
    errors = results["errors_ev"]
    assert [k for k in errors if k.startswith("test/")] == ["test/rtp", "test/irc", "test/nms"]
    assert sum(errors[f"test/{c}"]["n_molecules"] for c in ("rtp", "irc", "nms")) == errors["test"]["n_molecules"]
    assert all(np.isfinite(errors[k]["hessian_rmse"]) for k in errors)
    rows = [line.split()[0] for line in proc.stdout.splitlines() if line.split()[1:2] == ["energy"]]
    assert rows == ["test", "test/rtp", "test/irc", "test/nms"]


def test_holdout_categories_are_only_tested(molecules, tiny_config):
    """--holdout keeps whole categories (the paper's IRC and NMS sets) out of train and val."""
    import dataclasses

    mols = [dataclasses.replace(m, meta={**m.meta, "category": "irc" if i % 3 == 0 else "rtp"})
            for i, m in enumerate(molecules)]  # fmt: skip
    run = phljax.prepare(tiny_config.replace(holdout=("irc",)), mols)
    cat = {name: {mols[i].meta["category"] for i in idx} for name, idx in run.splits.items()}
    assert cat["train"] == cat["val"] == {"rtp"} and "irc" in cat["test"]
    assert sum(m.meta["category"] == "irc" for m in run.subset("test")) == len(mols) // 3
    plain = phljax.prepare(tiny_config, molecules)
    assert sum(len(v) for v in plain.splits.values()) == len(molecules)
    with pytest.raises(ValueError, match="no molecule has category"):
        phljax.prepare(tiny_config.replace(holdout=("ts",)), mols)


def test_select_trains_on_the_matching_records_only(molecules, tiny_config):
    """--select KEY=VALUE keeps the records whose meta matches (every filter), before the split."""
    import dataclasses

    mols = [dataclasses.replace(m, meta={**m.meta, "size_bin": "a" if i % 2 else "b"}) for i, m in enumerate(molecules)]
    run = phljax.prepare(tiny_config.replace(select=("size_bin=a",)), mols)
    assert {m.meta["size_bin"] for m in run.molecules} == {"a"} and len(run.molecules) == len(mols) // 2
    assert sum(len(v) for v in run.splits.values()) == len(run.molecules)
    with pytest.raises(ValueError, match=r"no record has size_bin = 'c' \(the data have \['a', 'b'\]\)"):
        phljax.prepare(tiny_config.replace(select=("size_bin=c",)), mols)
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        phljax.prepare(tiny_config.replace(select=("size_bin",)), mols)


def test_a_second_run_loads_its_programs_from_the_compile_cache(h5_path, tmp_path):
    """--compile-cache DIR: the first run stores its compiled steps, a second run of the same
    configuration (new work directory) compiles nothing new: every program comes from the cache."""
    cache = tmp_path / "cache"
    env = {k: v for k, v in SUBPROCESS_ENV.items() if k != "JAX_COMPILATION_CACHE_DIR"}

    def run(name):
        cmd = [sys.executable, "experiments/run.py", *cli_args(["--probe=random"], h5_path, str(tmp_path / name)),
               "--compile-cache", str(cache)]  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        with open(tmp_path / name / "results.json") as f:
            startup = json.load(f)["startup"]  # what the process compiled before its test evaluation
        assert startup["first_step_s"] > 0 and startup["programs"] >= 2, startup
        assert "compile or load" in proc.stdout
        return sorted(os.listdir(cache)), startup

    first, cold = run("first")
    assert len(first) >= 2  # at least the train and evaluation steps
    second, warm = run("second")
    assert second == first
    # the same programs, every one loaded instead of compiled (a cold run already hits the cache for
    # small programs it compiles twice under different names)
    assert warm["programs"] == cold["programs"] == warm["from_cache"] > cold["from_cache"]


def test_plateau_warmup_holds_the_rate_then_counts_and_resumes_into_it():
    params = {"w": jnp.zeros(2)}
    flat = jnp.asarray(1.0)  # a loss that never improves after the first epoch
    tx = phljax.make_optimizer(1e-2, lr_patience=2, plateau_warmup=4)
    state = tx.init(params)
    scales = []
    for _ in range(9):
        _, state = tx.update(params, state, params, value=flat)
        scales.append(learning_rate_scale(state))
    assert scales == [1.0] * 5 + [0.5, 0.5, 0.25, 0.25]  # 4 warm-up epochs, then a cut every 2 bad epochs
    assert scales == replay_schedule([1.0] * 9, lr_patience=2, plateau_warmup=4, first_monitor=1.0)
    # a run checkpointed without a warm-up continues as if it had had one
    plain = phljax.make_optimizer(1e-2, lr_patience=2)
    s0 = plain.init(params)
    _, s0 = plain.update(params, s0, params, value=flat)
    _, s0 = plain.update(params, s0, params, value=flat)  # plateau count 1 after 2 epochs
    resumed = continue_warmup(s0, 2, 4)
    for _ in range(3):
        _, resumed = plain.update(params, resumed, params, value=flat)
    assert learning_rate_scale(resumed) == 1.0  # held to epoch 4, one bad epoch (5)
    _, resumed = plain.update(params, resumed, params, value=flat)
    assert learning_rate_scale(resumed) == scales[5] == 0.5  # cut at epoch 6, as in the run warmed up from the start
    cut = continue_warmup(s0, 2, 0)  # no warm-up: unchanged
    for _ in range(2):
        _, cut = plain.update(params, cut, params, value=flat)
    assert learning_rate_scale(cut) == 0.5
    with pytest.raises(ValueError, match="already cut"):
        continue_warmup(cut, 4, 10)


def test_replay_schedule_reproduces_a_run_s_logged_rates(tiny_config, tmp_path):
    config = tiny_config.replace(workdir=str(tmp_path / "warm"), epochs=6, lr_patience=1, plateau_warmup=2)
    phljax.train(config)
    lines = _metrics(config.workdir)
    logged = [m["lr"] / config.learning_rate for m in lines]
    replayed = replay_schedule([m["val_loss"] for m in lines], lr_patience=1,
                                                  min_lr_scale=config.min_lr_scale, plateau_warmup=2)  # fmt: skip
    np.testing.assert_allclose(logged, replayed, rtol=1e-6)
    assert logged[:3] == [1.0] * 3  # the warm-up's 2 epochs and the first counted one cannot cut
