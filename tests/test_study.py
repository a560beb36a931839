"""The study runner: grid order, resumability and locks, status/ETA, the statistics of `aggregate`
(against hand computations), the tables, the CLI; and a 2-scheme x 2-seed mini-study end to end."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import TINY
from script_loader import load_script

from phljax import study as st
from phljax.config import Config
from phljax.data import bundled_path, load
from phljax.evaluation import STATIONARY, stationary_metrics
from phljax.potential import Potential
from phljax.study.runner import Job, run_cells
from phljax.study.stationary import STATIONARY_JSON, render_stationary, stationary_study
from phljax.train import train
from phljax.units import KCAL_MOL

# ---------------------------------------------------------------------------------------------
# helpers: fabricated cells


def _write_cell(root, protocol, name, *, errors=None, epochs_run=None, times=None, epoch_time=1.0, extra=None):
    """A cell directory with results.json (if `errors`) and metrics.jsonl (if `times`)."""
    workdir = os.path.join(root, protocol, name)
    os.makedirs(workdir, exist_ok=True)
    if times is not None:
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            for i, t in enumerate(times):
                line = {"epoch": i + 1, "val_loss": 1.0 / (i + 1), "epoch_time_s": t, "wall_time_s": t + 0.5}
                f.write(json.dumps({**line, **(extra or {})}) + "\n")
    if errors is not None:
        results = {
            "scheme": "x",
            "epochs_run": epochs_run if epochs_run is not None else len(times or [0]),
            "mean_epoch_time_s": epoch_time,
            "errors_kcal_mol": errors,
        }
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f)
    return workdir


def _errors(e, f, h, *, subsets=("test", "test/rtp", "test/nms"), **more):
    d = {"energy_rmse": e, "forces_rmse": f, "hessian_rmse": h, "energy_mae": e / 2, "n_molecules": 7, **more}
    return {s: dict(d) for s in subsets}


def _p_two_sided(d):
    """Paired t-test by hand: t = mean(d) / (std(d, ddof=1) / sqrt(n)), closed-form t CDF for df = 1, 2."""
    d = np.asarray(d, float)
    n = len(d)
    t = abs(d.mean() / (d.std(ddof=1) / np.sqrt(n)))
    if n == 2:  # df = 1: Cauchy
        return 1 - 2 * math.atan(t) / math.pi
    if n == 3:  # df = 2
        return 1 - t / math.sqrt(2 + t * t)
    raise AssertionError(n)


def _dead_pid():
    out = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(out.stdout)


def _lock(workdir, pid, host=None):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, st.LOCK), "w") as f:
        json.dump({"pid": pid, "host": host or socket.gethostname(), "start": "then"}, f)


# ---------------------------------------------------------------------------------------------
# the grid


def test_cells_priority_order_and_names():
    cells = st.Study(protocols=("random", "extrapolate"), regimes=("fixed", "randomized"), seeds=2).cells()
    names = [f"{c.protocol}/{c.name}" for c in cells]
    assert len(names) == len(set(names)) == 2 * 2 * (2 + 2 * 2)  # protocols x seeds x (E-F, E-F-H, 2 HVP x 2 regimes)
    # randomized regime first (whatever the order given); E-F and E-F-H with it; seed 0 of all schemes first
    assert names[:8] == [
        "random/ef-s0",
        "random/efhvp-onehot-randomized-s0",
        "random/efhvp-random-randomized-s0",
        "random/efh-s0",
        "random/ef-s1",
        "random/efhvp-onehot-randomized-s1",
        "random/efhvp-random-randomized-s1",
        "random/efh-s1",
    ]
    assert names[8] == "extrapolate/ef-s0"
    assert names[16:18] == ["random/efhvp-onehot-fixed-s0", "random/efhvp-random-fixed-s0"]
    assert all("fixed" in n for n in names[16:])
    for c in cells:
        assert st.Cell.parse(c.protocol, c.name) == c
    assert st.Cell.parse("random", "efh-fixed-s0") is None and st.Cell.parse("random", "ef") is None
    assert st.Cell.parse("nope", "ef-s0") is None
    with pytest.raises(ValueError, match="regime"):
        st.Cell("random", "none", "fixed", 0)
    with pytest.raises(ValueError, match="protocols"):
        st.Study(protocols=("random", "random"))


def test_protocol_configs_and_cell_config(tmp_path):
    assert st.protocol_config("random", 3)["test_fraction"] == 0.1
    extrapolate = st.protocol_config("extrapolate", 0)
    assert extrapolate["holdout"] == ("nms",) and extrapolate["test_fraction"] == 0.0
    names = [f"r{i:02d}" for i in range(12)][::-1]
    folds = st.reaction_folds(names, 4)
    assert folds[0] == ("r00", "r04", "r08") and folds[3] == ("r03", "r07", "r11")
    assert sorted(sum(folds, ())) == sorted(names)
    assert st.protocol_config("reactions", 5, folds=folds)["test_reactions"] == folds[1]  # seed 5 -> fold 1
    with pytest.raises(ValueError, match="folds"):
        st.reaction_folds(names[:3], 4)
    base = Config(epochs=7, channels=4)
    cell = st.Cell("extrapolate", "random", "fixed", 3)
    config = st.cell_config(cell, base, str(tmp_path))
    assert (config.probe, config.probe_mode, config.probe_dist, config.seed, config.split_seed) == (
        "random",
        "fixed",
        "gaussian",
        3,
        3,
    )
    assert config.holdout == ("nms",) and config.epochs == 7 and config.channels == 4
    assert config.workdir == os.path.join(str(tmp_path), "extrapolate", "efhvp-random-fixed-s3")


def test_reactions_protocol_sets_test_reactions(tmp_path):
    if "test_reactions" not in Config.__dataclass_fields__:
        pytest.skip("Config has no test_reactions field yet")
    folds = st.reaction_folds([f"r{i}" for i in range(8)], 4)
    config = st.cell_config(st.Cell("reactions", "none", None, 6), Config(), str(tmp_path), folds=folds)
    assert config.test_reactions == folds[2] and config.test_fraction == 0.0
    assert st.cell_config(st.Cell("random", "none", None, 0), Config(), str(tmp_path)).test_reactions == ()


# ---------------------------------------------------------------------------------------------
# locks, settings, status


def test_locks(tmp_path):
    workdir = str(tmp_path / "cell")
    assert st.acquire_lock(workdir)
    assert not st.acquire_lock(workdir)  # held by this (live) process
    st.release_lock(workdir)
    assert not os.path.exists(os.path.join(workdir, st.LOCK))
    _lock(workdir, _dead_pid())  # a dead pid on this host: stale, replaced
    assert st.acquire_lock(workdir)
    with open(os.path.join(workdir, st.LOCK)) as f:
        info = json.load(f)
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and "start" in info
    st.release_lock(workdir)
    _lock(workdir, _dead_pid(), host="another-node")  # another host: cannot tell, so held
    assert not st.acquire_lock(workdir)
    st.release_lock(workdir)  # not ours: left alone
    assert os.path.exists(os.path.join(workdir, st.LOCK))


def test_run_cells_rechecks_done_under_the_lock(tmp_path):
    """A cell another process finishes between the done check and taking its lock is not made again."""
    workdir = str(tmp_path / "cell")
    answers = iter([False, True])  # not done at the first look, done once the lock is held
    made = []
    job = Job("cell", workdir, lambda: made.append(1), lambda _w: next(answers))
    outcome = run_cells(str(tmp_path), [job], log=lambda _m: None)
    assert made == [] and outcome["done"] == ["cell"] and outcome["trained"] == []
    assert not os.path.exists(os.path.join(workdir, st.LOCK))


def test_settings_checked_on_continue(tmp_path):
    root = str(tmp_path)
    base = Config(epochs=3, channels=4)
    st.open_study(root, base, st.Study(protocols=("random",), seeds=2))
    st.open_study(
        root, base.replace(progress=False, workdir="elsewhere"), st.Study(protocols=("extrapolate",), seeds=3)
    )
    with open(os.path.join(root, st.STUDY_JSON)) as f:
        grid = json.load(f)["grid"]
    assert grid["protocols"] == ["random", "extrapolate"] and grid["seeds"] == 3  # the grid grows
    with pytest.raises(ValueError, match=r"\['channels', 'epochs'\].*epochs: 3 -> 4"):
        st.open_study(root, base.replace(epochs=4, channels=8), st.Study())
    with pytest.raises(ValueError, match="n_folds"):
        st.open_study(root, base, st.Study(n_folds=3))
    with pytest.raises(ValueError, match=r"sets \['seed', 'holdout'\]"):
        st.open_study(root, base.replace(seed=1, holdout=("nms",)), st.Study())


def test_status_and_eta(tmp_path):
    root = str(tmp_path)
    st.open_study(
        root,
        Config(epochs=10),
        st.Study(protocols=("random",), probes=("none", "random"), regimes=("randomized",), seeds=2),
    )
    errors = _errors(1.0, 2.0, 3.0)
    _write_cell(root, "random", "ef-s0", errors=errors, times=[5, 1, 1, 1, 1, 1])  # done in 6 epochs
    _write_cell(root, "random", "ef-s1", times=[4, 2, 2])  # interrupted after 3 epochs
    hvp = _write_cell(root, "random", "efhvp-random-randomized-s0", times=[9, 3, 3])
    _lock(hvp, os.getpid())  # a live process trains it
    failed = _write_cell(root, "random", "efhvp-random-randomized-s1")
    with open(os.path.join(failed, st.FAILED), "w") as f:
        f.write("{}")
    rows = {r.cell.name: r for r in st.status(root)}
    assert [r.state for r in rows.values()] == ["done", "running", "left", "failed"]
    assert rows["ef-s0"].epochs == 6 and rows["ef-s0"].eta_s == 0
    # E-F: median of epoch times without first epochs [1]*5 + [2, 2] = 1 s; expected epochs: median of done = 6
    assert rows["ef-s1"].epoch_time_s == 1 and rows["ef-s1"].expected_epochs == 6 and rows["ef-s1"].eta_s == 3
    # E-F-HVP: times [3, 3], no run done -> the epochs cap, 10
    assert rows["efhvp-random-randomized-s0"].eta_s == (10 - 3) * 3
    assert rows["efhvp-random-randomized-s1"].eta_s == 10 * 3
    text = st.format_status(list(rows.values()))
    assert "1/4 done, 1 running, 1 failed, 1 left" in text and "| random | ef-s1 | left | 3 | 1 | 3 s |" in text
    assert "random: all 2 cells done for seeds none (0 of 2)" in text
    _write_cell(root, "random", "ef-s1", errors=errors, times=[4, 2, 2])
    _write_cell(root, "random", "efhvp-random-randomized-s0", errors=errors, times=[9, 3, 3])
    assert "random: all 2 cells done for seeds 0 (1 of 2)" in st.format_status(st.status(root))


def _fake_train(results):
    """A stand-in for `train` that writes `results` as results.json (no training)."""

    def fake(config):
        os.makedirs(config.workdir, exist_ok=True)
        with open(os.path.join(config.workdir, "results.json"), "w") as f:
            json.dump(results, f)
        return results

    return fake


def test_keep_going_and_stop_after_the_run_in_flight(tmp_path):
    root = str(tmp_path)
    study = st.Study(protocols=("random",), probes=("none", "onehot"), regimes=("randomized",), seeds=2)
    done = _fake_train({"errors_kcal_mol": _errors(1.0, 2.0, 3.0)})
    seen = []

    def flaky(config):
        seen.append(os.path.basename(config.workdir))
        assert os.path.exists(os.path.join(config.workdir, st.LOCK))  # trained under its lock
        if config.probe == "onehot" and config.seed == 0:
            raise FloatingPointError("NaN loss")
        if config.seed == 1:
            open(os.path.join(root, st.STOP), "w").close()  # `touch STOP` while ef-s1 trains
        return done(config)

    with pytest.raises(FloatingPointError):
        st.run_study(root, Config(), study, train_fn=flaky, log=lambda _: None)
    assert seen == ["ef-s0", "efhvp-onehot-randomized-s0"]
    assert not os.path.exists(os.path.join(root, "random", "efhvp-onehot-randomized-s0", st.LOCK))
    outcome = st.run_study(root, Config(), study, train_fn=flaky, keep_going=True, log=lambda _: None)
    assert seen[2:] == ["efhvp-onehot-randomized-s0", "ef-s1"]  # ef-s0 done; ef-s1 finishes, then STOP
    assert outcome["failed"] == ["random/efhvp-onehot-randomized-s0"] and outcome["trained"] == ["random/ef-s1"]
    assert outcome["left"] == ["random/efhvp-onehot-randomized-s1"]
    assert [r.state for r in st.status(root)] == ["done", "failed", "done", "left"]
    with open(os.path.join(root, "random", "efhvp-onehot-randomized-s0", st.FAILED)) as f:
        assert "NaN loss" in json.load(f)["error"]


# ---------------------------------------------------------------------------------------------
# aggregation on fabricated results


@pytest.fixture
def fabricated(tmp_path):
    """3 seeds of E-F, E-F-H and both randomized HVP schemes; fixed one-hot with seeds 0, 1 only."""
    root = str(tmp_path)
    rng = np.random.default_rng(0)
    values = {}
    for key, scale in [
        ("ef", 2.0),
        ("efh", 1.0),
        ("efhvp-onehot-randomized", 1.2),
        ("efhvp-random-randomized", 1.1),
        ("efhvp-random-fixed", 1.3),
        ("efhvp-onehot-fixed", 1.5),
    ]:
        seeds = (0, 1) if key == "efhvp-onehot-fixed" else (0, 1, 2)
        for s in seeds:
            e, f, h = scale * (1 + 0.1 * rng.random(3)) * np.array([1.0, 5.0, 20.0])
            errors = _errors(e, f, h, label="text")
            if s == 1:
                errors["test"]["only_here"] = 1.0  # not reported by every run: not aggregated
            values[key, s] = errors
            _write_cell(root, "random", f"{key}-s{s}", errors=errors, times=[2.0, 1.0], epoch_time=scale)
    # a protocol whose results name only 'test' (all NMS): reported as 'nms' too
    _write_cell(root, "extrapolate", "ef-s0", errors={"test": values["ef", 0]["test"]}, times=[1.0])
    os.makedirs(os.path.join(root, "random", "not-a-cell"))
    return root, values


def test_aggregate_statistics(fabricated):
    root, values = fabricated
    agg = st.aggregate(root)
    with open(os.path.join(root, "aggregate.json")) as f:
        assert json.load(f, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) == json.loads(
            json.dumps(agg)
        )
    cells = agg["protocols"]["random"]["cells"]
    assert list(cells) == [
        "ef",
        "efhvp-onehot-randomized",
        "efhvp-onehot-fixed",
        "efhvp-random-randomized",
        "efhvp-random-fixed",
        "efh",
    ]
    ef = cells["ef"]["subsets"]["rtp"]
    x = [values["ef", s]["test/rtp"]["forces_rmse"] for s in range(3)]
    assert ef["forces_rmse"]["n"] == 3 and ef["forces_rmse"]["seeds"] == [0, 1, 2]
    np.testing.assert_allclose(ef["forces_rmse"]["mean"], np.mean(x), rtol=1e-12)
    np.testing.assert_allclose(ef["forces_rmse"]["std"], np.std(x, ddof=1), rtol=1e-12)
    assert list(cells["ef"]["subsets"]) == ["test", "rtp", "nms"]
    assert set(cells["ef"]["subsets"]["test"]) == {
        "n_molecules",
        "energy_rmse",
        "forces_rmse",
        "hessian_rmse",
        "energy_mae",
    }
    np.testing.assert_allclose(cells["efh"]["mean_epoch_time_s"]["mean"], 1.0)

    pairs = agg["protocols"]["random"]["pairs"]
    assert set(pairs) == {f"{a} vs {b}" for a, b, _ in st.comparison_pairs()}
    # 3 seeds: df = 2
    pair = pairs["efhvp-random-randomized vs efh"]["subsets"]["nms"]["hessian_rmse"]
    a = np.array([values["efhvp-random-randomized", s]["test/nms"]["hessian_rmse"] for s in range(3)])
    b = np.array([values["efh", s]["test/nms"]["hessian_rmse"] for s in range(3)])
    assert pair["n"] == 3
    np.testing.assert_allclose(pair["mean_diff"], np.mean(a - b), rtol=1e-12)
    np.testing.assert_allclose(pair["rel_diff_pct"], 100 * (a.mean() - b.mean()) / b.mean(), rtol=1e-12)
    np.testing.assert_allclose(pair["p_value"], _p_two_sided(a - b), rtol=1e-9)
    # one member lacks seed 2: only seeds 0 and 1 count, df = 1
    pair = pairs["efhvp-random-fixed vs efhvp-onehot-fixed"]["subsets"]["test"]["energy_rmse"]
    a = np.array([values["efhvp-random-fixed", s]["test"]["energy_rmse"] for s in (0, 1)])
    b = np.array([values["efhvp-onehot-fixed", s]["test"]["energy_rmse"] for s in (0, 1)])
    assert pair["n"] == 2 and pair["seeds"] == [0, 1]
    np.testing.assert_allclose(pair["rel_diff_pct"], 100 * (a.mean() - b.mean()) / b.mean(), rtol=1e-12)
    np.testing.assert_allclose(pair["p_value"], _p_two_sided(a - b), rtol=1e-9)

    extrapolate = agg["protocols"]["extrapolate"]
    assert extrapolate["cells"]["ef"]["subsets"]["nms"] == extrapolate["cells"]["ef"]["subsets"]["test"]
    assert extrapolate["cells"]["ef"]["subsets"]["test"]["energy_rmse"]["std"] is None  # n = 1
    assert extrapolate["pairs"] == {}


def test_paired_edge_cases():
    assert st.stats.paired({0: 1.0}, {0: 2.0})["p_value"] is None  # n = 1
    assert st.stats.paired({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})["p_value"] is None  # no spread: NaN -> None
    assert st.stats.paired({0: 1.0}, {1: 2.0}) == {
        "n": 0,
        "seeds": [],
        "mean_diff": None,
        "rel_diff_pct": None,
        "p_value": None,
    }


def test_render_tables(fabricated):
    root, values = fabricated
    agg = st.aggregate(root)
    text = st.render_tables(agg)
    assert "### Table 1: randomized probes" in text and "### Table 2: fixed probes" in text
    ef = agg["protocols"]["random"]["cells"]["ef"]["subsets"]["test"]["energy_rmse"]
    assert f"| E-F | 3 | {ef['mean']:.3g} ± {ef['std']:.3g} |" in text
    change = agg["protocols"]["random"]["pairs"]["efh vs ef"]["subsets"]["test"]["energy_rmse"]["rel_diff_pct"]
    assert f"({change:+.1f}%)" in text
    onehot_fixed = next(line for line in text.splitlines() if line.startswith("| E-F-HVP one-hot (fixed) |"))
    assert "n=2, not reported" in onehot_fixed  # 2 seeds: marked, not reported
    random_vs_onehot = next(line for line in text.splitlines() if line.startswith("| random vs one-hot |"))
    assert random_vs_onehot.count("n=2, not reported") == 9  # 3 subsets x E, F, H
    assert "| E-F-HVP random (randomized) vs E-F-H |" in text and "(p=" in text
    assert "n=2, not reported" not in st.render_tables(agg, min_seeds=2)
    assert "## Protocol `extrapolate`" in text


def test_learning_curves(fabricated, tmp_path):
    root, _ = fabricated
    curves = st.learning_curves(root)["random"]["ef"]
    np.testing.assert_allclose(curves["wall_time_s"], [2.5, 4.0])  # cumulative
    np.testing.assert_allclose(curves["val_loss"], [1.0, 0.5])
    assert "energy_rmse" not in curves
    other = str(tmp_path / "other")
    extra = {"val_energy_rmse": 0.1, "val_forces_rmse": 0.2, "val_hessian_rmse": 0.3}
    _write_cell(other, "random", "efh-s0", times=[1.0, 1.0, 1.0], extra=extra)
    _write_cell(other, "random", "efh-s1", times=[1.0, 1.0], extra={**extra, "val_energy_rmse": 0.3})
    with open(os.path.join(other, "random", "efh-s1", "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"epoch": 3, "val_loss": 0.1, "epoch_time_s": 1.0, "wall_time_s": 1.5}) + "\n")
    _write_cell(other, "random", "efh-s2", times=[1.0], extra={**extra, "val_energy_rmse": 0.5})  # stopped early
    curves = st.learning_curves(other)["random"]["efh"]
    np.testing.assert_array_equal(curves["n_runs"], [3, 2, 2])
    # seed-mean over the runs that logged errors at each epoch (s1 did not at epoch 3)
    np.testing.assert_allclose(curves["energy_rmse"], np.array([0.3, 0.2, 0.1]) / KCAL_MOL, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# the CLI


def test_cli_parse_status_aggregate_plots(fabricated, tmp_path):
    cli = load_script("experiments", "study")
    args, base = cli.parse(["--root", "r", "--seeds", "2", "--epochs", "3", "--seed", "4", "--schemes", "none"])
    assert (args.root, args.seeds, args.schemes) == ("r", 2, ["none"])
    assert base.epochs == 3 and base.seed == 4  # --seed is run.py's, not an abbreviation of --seeds
    with pytest.raises(ValueError, match="sets"):
        st.open_study(str(tmp_path / "s"), base, st.Study())
    root, _ = fabricated
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli.main(["--root", root, "--aggregate", "--plots", str(tmp_path / "plots")])
    assert "### Table 1" in out.getvalue()
    for name in ("curves-random.png", "bars-random.png", "curves-extrapolate.png", "bars-extrapolate.png"):
        with open(tmp_path / "plots" / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    st.open_study(root, Config(), st.Study(protocols=("random",), seeds=3))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli.main(["--root", root, "--status"])
    assert "| random | efhvp-random-fixed-s2 | done |" in out.getvalue()


# ---------------------------------------------------------------------------------------------
# a mini-study end to end: E-F and E-F-HVP random, randomized probes, 2 seeds, tiny model, 1 epoch

BASE = Config(data=(bundled_path("chon_nms_small.h5"),), epochs=1, batch_size=8, progress=False, **TINY)
MINI = st.Study(protocols=("random",), probes=("none", "random"), regimes=("randomized",), seeds=2)


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("study") / "root")
    calls = []

    def counting(config):
        calls.append(config)
        return train(config)

    outcome = st.run_study(root, BASE, MINI, train_fn=counting, log=lambda _: None)
    return root, calls, outcome


def _no_training(config):
    raise AssertionError(f"trained {config.workdir} again")


def test_mini_study_end_to_end(mini):
    root, calls, outcome = mini
    names = ["ef-s0", "efhvp-random-randomized-s0", "ef-s1", "efhvp-random-randomized-s1"]
    assert [os.path.basename(c.workdir) for c in calls] == names
    assert [(c.probe, c.seed, c.split_seed) for c in calls] == [
        ("none", 0, 0),
        ("random", 0, 0),
        ("none", 1, 1),
        ("random", 1, 1),
    ]
    assert outcome["trained"] == [os.path.join("random", n) for n in names]
    rows = st.status(root)
    assert [r.state for r in rows] == ["done"] * 4 and all(r.epochs == 1 and r.eta_s == 0 for r in rows)
    assert not any(os.path.exists(os.path.join(root, "random", n, st.LOCK)) for n in names)

    # done cells are never trained again; execution-only fields may change
    mtimes = [os.path.getmtime(os.path.join(root, "random", n, "results.json")) for n in names]
    again = st.run_study(root, BASE.replace(progress=True), MINI, train_fn=_no_training, log=lambda _: None)
    assert again["done"] == outcome["trained"] and not again["trained"]
    assert mtimes == [os.path.getmtime(os.path.join(root, "random", n, "results.json")) for n in names]

    # changed settings are refused, naming the field
    with pytest.raises(ValueError, match=r"\['epochs'\]"):
        st.run_study(root, BASE.replace(epochs=2), MINI, train_fn=_no_training, log=lambda _: None)

    # aggregate: mean, std and paired t-test p of E-F-HVP random vs E-F against numpy by hand (n = 2, df = 1)
    agg = st.aggregate(root)
    res = {}
    for n in names:
        with open(os.path.join(root, "random", n, "results.json")) as f:
            res[n] = json.load(f)["errors_kcal_mol"]["test"]
    for q in ("energy_rmse", "forces_rmse", "hessian_rmse"):
        a = np.array([res[f"efhvp-random-randomized-s{s}"][q] for s in (0, 1)])
        b = np.array([res[f"ef-s{s}"][q] for s in (0, 1)])
        cell = agg["protocols"]["random"]["cells"]["efhvp-random-randomized"]["subsets"]["test"][q]
        np.testing.assert_allclose([cell["mean"], cell["std"]], [a.mean(), a.std(ddof=1)], rtol=1e-12)
        pair = agg["protocols"]["random"]["pairs"]["efhvp-random-randomized vs ef"]["subsets"]["test"][q]
        assert pair["n"] == 2
        np.testing.assert_allclose(pair["mean_diff"], np.mean(a - b), rtol=1e-12)
        np.testing.assert_allclose(pair["p_value"], _p_two_sided(a - b), rtol=1e-9)
    assert "n=2, not reported" in st.render_tables(agg)


def test_stationary_study_at_every_rtp_point(mini, tmp_path):
    """Item 5 at all 36 RTP points: per-cell metrics are stationary_metrics of the cell's best
    model by kind of point, kept once computed; stats and paired tests over seeds by hand."""
    root = str(tmp_path / "copy")
    shutil.copytree(mini[0], root)
    rtp = [bundled_path("chon_reactions-RTP.h5")]
    found = stationary_study(root, rtp, ["random"])
    assert found["n_points"] == {"all": 36, "minima": 24, "ts": 12}
    points = [m for m in load(rtp) if m.meta.get("point") in STATIONARY]
    workdir = os.path.join(root, "random", "ef-s1")
    direct = stationary_metrics(Potential.from_workdir(workdir), [m for m in points if m.meta["point"] == "ts"])
    with open(os.path.join(workdir, STATIONARY_JSON)) as f:
        kept = json.load(f)
    assert kept["ts"]["n_stationary"] == 12 and kept["all"]["n_ts"] == 12
    np.testing.assert_allclose(kept["ts"]["frequency_mae_cm1"], direct["frequency_mae_cm1"], rtol=1e-9)
    np.testing.assert_allclose(kept["ts"]["hessian_eigenvalue_mae"], direct["hessian_eigenvalue_mae"] / KCAL_MOL)
    assert kept["ts"]["stationary_index_correct"] == direct["stationary_index_correct"]

    cells = found["protocols"]["random"]["cells"]
    assert set(cells) == {"ef", "efhvp-random-randomized"} and cells["ef"]["seeds"] == [0, 1]
    per = {}
    for n in ("ef-s0", "ef-s1", "efhvp-random-randomized-s0", "efhvp-random-randomized-s1"):
        with open(os.path.join(root, "random", n, STATIONARY_JSON)) as f:
            per[n] = json.load(f)["all"]["frequency_mae_cm1"]
    a = np.array([per["efhvp-random-randomized-s0"], per["efhvp-random-randomized-s1"]])
    b = np.array([per["ef-s0"], per["ef-s1"]])
    got = cells["efhvp-random-randomized"]["all"]["frequency_mae_cm1"]
    np.testing.assert_allclose([got["mean"], got["std"]], [a.mean(), a.std(ddof=1)], rtol=1e-12)
    pair = found["protocols"]["random"]["pairs"]["efhvp-random-randomized vs ef"]["all"]["frequency_mae_cm1"]
    np.testing.assert_allclose(pair["p_value"], _p_two_sided(a - b), rtol=1e-9)
    assert "| E-F-HVP random" in render_stationary(found, min_seeds=2)

    # kept results are read back, not recomputed
    mtime = os.path.getmtime(os.path.join(workdir, STATIONARY_JSON))
    assert stationary_study(root, rtp, ["random"]) == found
    assert os.path.getmtime(os.path.join(workdir, STATIONARY_JSON)) == mtime


def _strip_new_metrics(path, *, scale_energy=1.0):
    """results.json as an evaluation from before energy_rel_* and unidentified_formulas wrote it."""
    with open(path) as f:
        results = json.load(f)
    full = json.loads(json.dumps(results))
    results.pop("unidentified_formulas")
    for errors in (results["errors_ev"], results["errors_kcal_mol"]):
        for d in errors.values():
            for k in ("energy_rel_mae", "energy_rel_rmse", "n_energy_rel", "n_formulas"):
                d.pop(k)
            d["energy_rmse"] *= scale_energy
    with open(path, "w") as f:
        json.dump(results, f)
    return full


def test_reevaluate_adds_newer_metrics_and_keeps_the_rest(mini, tmp_path):
    root = str(tmp_path / "copy")
    shutil.copytree(mini[0], root)
    path = os.path.join(root, "random", "ef-s0", "results.json")
    full = _strip_new_metrics(path)
    assert st.reevaluate(root, ["random"], log=lambda _: None) == [os.path.join("random", "ef-s0")]
    with open(path) as f:
        back = json.load(f)
    assert back["unidentified_formulas"] == full["unidentified_formulas"] == {}  # one formula set throughout
    for units in ("errors_ev", "errors_kcal_mol"):
        for subset, d in full[units].items():
            assert set(back[units][subset]) == set(d)
            for k, v in d.items():
                np.testing.assert_allclose(back[units][subset][k], v, rtol=1e-5, err_msg=f"{units} {subset} {k}")
    assert st.reevaluate(root, ["random"], log=lambda _: None) == []  # every cell current now

    # a kept value the checkpoint does not reproduce is refused, naming the cell
    bad = os.path.join(root, "random", "ef-s1", "results.json")
    _strip_new_metrics(bad, scale_energy=2.0)
    with pytest.raises(ValueError, match=r"ef-s1: re-evaluated test energy_rmse"):
        st.reevaluate(root, ["random"], log=lambda _: None)
    assert not os.path.exists(os.path.join(root, "random", "ef-s1", st.LOCK))


def test_mini_study_resumes_interrupted_and_skips_locked(mini, tmp_path):
    root = str(tmp_path / "copy")
    shutil.copytree(mini[0], root)
    interrupted = os.path.join(root, "random", "efhvp-random-randomized-s1")
    os.remove(os.path.join(interrupted, "results.json"))
    _lock(interrupted, _dead_pid())  # the process that trained it died
    elsewhere = os.path.join(root, "random", "ef-s1")
    os.remove(os.path.join(elsewhere, "results.json"))
    _lock(elsewhere, 1, host="another-node")  # trained right now on another node
    assert [r.state for r in st.status(root)] == ["done", "done", "running", "left"]
    calls = []

    def counting(config):
        calls.append(config.workdir)
        return train(config)

    outcome = st.run_study(root, BASE, MINI, train_fn=counting, log=lambda _: None)
    assert calls == [interrupted]
    assert outcome["running"] == [os.path.join("random", "ef-s1")]
    assert os.path.exists(os.path.join(interrupted, "results.json"))
    assert not os.path.exists(os.path.join(interrupted, st.LOCK))
    with open(os.path.join(interrupted, "metrics.jsonl")) as f:
        assert len(f.readlines()) == 1  # resumed from its checkpoint at the epochs cap: nothing retrained


def test_a_killed_study_resumes_without_redoing_or_doubling_anything(tmp_path):
    """`experiments/study.py` (1 scheme x 2 seeds, 3 epochs) SIGKILLed while it trains its second
    cell, then run again to the end: the finished cell is not redone, the killed one resumes from
    its checkpoint with each epoch logged once, and the aggregate equals an uninterrupted study's."""
    import signal
    import time

    from conftest import REPO, SUBPROCESS_ENV

    def cmd(root):
        return [sys.executable, os.path.join(REPO, "experiments", "study.py"), "--root", str(root),
                "--protocol", "random", "--schemes", "none", "--seeds", "2", "--channels", "4", "--num-layers", "1",
                "--lmax", "1", "--epochs", "3", "--batch-size", "8", "--data", bundled_path("chon_nms_small.h5"),
                "--no-progress"]  # fmt: skip

    def study(root, log):
        with open(log, "w") as f:
            return subprocess.Popen(cmd(root), cwd=REPO, env=SUBPROCESS_ENV, stdout=f, stderr=subprocess.STDOUT)

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    first, second = (killed / "random" / name for name in ("ef-s0", "ef-s1"))
    reference = study(straight, tmp_path / "straight.log")  # the uninterrupted study, side by side
    job = study(killed, tmp_path / "killed.log")
    try:
        deadline = time.monotonic() + 900
        while not (os.path.exists(first / "results.json") and len(st.cell_metrics(str(second))) >= 1):
            assert job.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the second cell did not start"
            time.sleep(0.02)
        os.kill(job.pid, signal.SIGKILL)
        job.wait()
        assert reference.wait(900) == 0, (tmp_path / "straight.log").read_text()[-3000:]
    finally:
        for p in (job, reference):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert not os.path.exists(second / "results.json") and os.path.exists(second / st.LOCK)  # killed mid-cell
    done = {f: os.stat(first / f).st_mtime_ns for f in ("results.json", "metrics.jsonl")}
    rerun = subprocess.run(cmd(killed), cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "random/ef-s1: resuming after epoch" in rerun.stdout, rerun.stdout[-3000:]

    assert {f: os.stat(first / f).st_mtime_ns for f in done} == done  # the finished cell was not trained again
    assert [r.state for r in st.status(str(killed))] == ["done", "done"]
    assert not os.path.exists(second / st.LOCK)
    for root in (killed, straight):
        for name in ("ef-s0", "ef-s1"):
            with open(root / "random" / name / "metrics.jsonl") as f:
                epochs = [json.loads(line)["epoch"] for line in f if line.strip()]
            assert epochs == [1, 2, 3], (root, name, epochs)

    def without_times(agg):
        """The aggregate without what differs between two runs of the same study: root, timings."""
        for cell in agg["protocols"]["random"]["cells"].values():
            cell.pop("mean_epoch_time_s", None)
        return {k: v for k, v in agg.items() if k != "root"}

    def same(a, b, where="aggregate"):  # equal, numbers to 1e-6 relative (float reductions)
        if isinstance(a, dict):
            assert a.keys() == b.keys(), where
            for k in a:
                same(a[k], b[k], f"{where}/{k}")
        elif isinstance(a, list):
            assert len(a) == len(b), where
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                same(x, y, f"{where}/{i}")
        elif isinstance(a, float):
            np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=where)
        else:
            assert a == b, (where, a, b)

    a, b = without_times(st.aggregate(str(killed))), without_times(st.aggregate(str(straight)))
    assert a["protocols"]["random"]["cells"]["ef"]["seeds"] == [0, 1]
    same(a, b)


def test_time_to_target_takes_the_loosest_curvature_run_and_counts_training_time(tmp_path):
    """Target = the loosest best validation Hessian RMSE of any curvature run; each run's time is its
    cumulative training time to the first epoch at or below it; E-F (never there) counts 0 of n."""

    def cell(name, hessian, epoch_time):
        workdir = tmp_path / "extrapolate" / name
        workdir.mkdir(parents=True)
        (workdir / "results.json").write_text("{}")
        lines = [
            {"epoch": i + 1, "epoch_time_s": epoch_time, **({"val_hessian_rmse": h * KCAL_MOL} if h else {})}
            for i, h in enumerate(hessian)
        ]
        (workdir / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")

    cell("ef-s0", [300, None, 290, None], 0.1)
    cell("efhvp-random-randomized-s0", [200, None, 60, None, 50], 0.5)  # best 50
    cell("efhvp-random-randomized-s1", [200, None, 70, None, 65], 0.5)  # best 65: the target
    cell("efh-s0", [100, 40, 30], 10.0)
    cell("efh-s1", [90, 64, 20], 12.0)
    ttt = st.stats.time_to_target(str(tmp_path), "extrapolate")
    assert ttt["target"] == pytest.approx(65.0)
    cells = ttt["cells"]
    assert (cells["ef"]["reached"], cells["ef"]["runs"], cells["ef"]["epochs"]) == (0, 1, None)
    rand = cells["efhvp-random-randomized"]
    assert rand["reached"] == 2 and rand["epochs"]["values"] == [3.0, 5.0]
    assert rand["train_time_s"]["values"] == pytest.approx([1.5, 2.5])
    assert cells["efh"]["train_time_s"]["values"] == pytest.approx([20.0, 24.0])  # epoch 2 of each
    ratio = ttt["efh_over_hvp_epoch_time"]["efhvp-random-randomized"]  # median epoch times, paired seeds
    assert ratio["values"] == pytest.approx([20.0, 24.0])
    assert "Time to a validation Hessian RMSE of 65" in st.render_tables(st.aggregate(str(tmp_path)), min_seeds=1)


def test_checkpoint_selection_reads_the_selected_epoch_and_the_best_of_any_epoch(tmp_path):
    """Selected = validation E at the logged epoch nearest the lowest validation loss; its cost =
    selected minus the run's best E at any logged epoch; vs E-F: best-any-epoch minus E-F's selected."""

    def cell(name, val_loss, energy):
        workdir = tmp_path / "extrapolate" / name
        workdir.mkdir(parents=True)
        (workdir / "results.json").write_text("{}")
        lines = [{"epoch": i + 1, "val_loss": v, **({"val_energy_rmse": e * KCAL_MOL} if e else {})}
                 for i, (v, e) in enumerate(zip(val_loss, energy, strict=True))]  # fmt: skip
        (workdir / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")

    cell("ef-s0", [5, 4, 3, 3.5], [9, None, 4, 2])  # selected epoch 3: 4; best any 2
    cell("efhvp-random-randomized-s0", [5, 2, 3, 4], [9, None, 7, 6])  # best loss epoch 2: nearest logged 1 or 3
    sel = st.stats.checkpoint_selection(str(tmp_path), "extrapolate")
    ef, hvp = sel["cells"]["ef"], sel["cells"]["efhvp-random-randomized"]
    assert ef["at_selected"]["values"] == pytest.approx([4.0]) and ef["selection_cost"]["values"] == pytest.approx(
        [2.0]
    )
    assert hvp["at_selected"]["values"] == pytest.approx([9.0])  # epoch 1 is as near as 3: the first wins
    assert sel["vs_ef"]["efhvp-random-randomized"]["values"] == pytest.approx([6.0 - 4.0])
    assert "Checkpoint selection" in st.render_tables(st.aggregate(str(tmp_path)), min_seeds=1)
