"""The size-scaling study (phljax.study.scaling): estimator variances, and a 2-bin x 2-scheme x
2-seed study end to end on a tiny real xTB set, its statistics checked by hand."""

from __future__ import annotations

import json
import os
import shutil
import threading

import numpy as np
import pytest
from conftest import TINY
from scipy import stats

import phljax
from phljax.files import locked
from phljax.study import scaling, scaling_report
from phljax.study.stats import paired, seed_stats

pytest.importorskip("tblite")
pytest.importorskip("rdkit")

from phljax.datagen import scale  # noqa: E402 (after the optional-dependency skips)


def test_estimator_variances_match_monte_carlo_on_a_local_error_matrix():
    rng = np.random.default_rng(0)
    d = 30
    dh = np.diag(rng.normal(size=d)) + 0.3 * np.diag(rng.normal(size=d - 1), 1)
    out = scaling.estimator_variances(dh, rng, n_draws=40000)
    a = (0.5 * (dh + dh.T)).T @ (0.5 * (dh + dh.T))
    assert out["trace"] == pytest.approx(np.trace(a))
    np.testing.assert_allclose(out["formula"]["gaussian"], 2 * np.sum(a**2))
    np.testing.assert_allclose(out["formula"]["rademacher"], 2 * (np.sum(a**2) - np.sum(np.diag(a) ** 2)))
    np.testing.assert_allclose(out["formula"]["onehot"], d * np.sum(np.diag(a) ** 2) - np.trace(a) ** 2)
    for fam, v in out["formula"].items():
        assert out["empirical"][fam] == pytest.approx(v, rel=0.1), fam
    assert out["k"] == 4 and out["k_probe"]["gaussian"] == pytest.approx(out["formula"]["gaussian"] / 4)
    assert 0 < out["k_probe"]["orthogonal"] < out["k_probe"]["gaussian"]


def test_fit_exponent_recovers_a_power_law():
    n = np.array([10, 20, 40, 80, 160.0])
    noise = np.exp(np.random.default_rng(1).normal(0, 0.1, n.size))
    fit = scaling.fit_exponent(n, 3.0 * n**1.7 * noise)
    assert fit["exponent"] == pytest.approx(1.7, abs=0.15) and fit["ci95"][0] <= 1.7 <= fit["ci95"][1]
    assert fit["p_value"] == pytest.approx(stats.linregress(np.log(n), np.log(3.0 * n**1.7 * noise)).pvalue)
    two = scaling.fit_exponent([10, 20], [1.0, 4.0])  # a line through 2 points: no interval, no test
    assert two["exponent"] == pytest.approx(2.0) and two["ci95"] is two["p_value"] is two["stderr"] is None


def test_plateau_exit_is_the_first_epoch_below_a_fraction_of_the_first(tmp_path):
    force = [1.0, 0.99, 0.98, 0.85, 0.79, 0.5]  # epoch 5 is the first below 0.8 x epoch 1's
    lines = [{"epoch": e, "train_force_loss": f} for e, f in enumerate(force, 1)]
    lines.insert(3, {"epoch": 4, "train_force_loss": 0.7})  # epoch 4 logged, redone after a resume: last counts
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write("".join(json.dumps(line) + "\n" for line in lines))
    assert scaling.plateau_exit(str(tmp_path)) == 5
    assert scaling.plateau_exit(str(tmp_path), frac=0.4) is None
    assert scaling.plateau_exit(str(tmp_path / "missing")) is None


def test_cells_and_their_configs(tmp_path):
    grid = scaling.ScaleGrid(("4-9", "1-3"), ("ef", "onehot", "orthogonal", "efh"), ("fixed", "pool", "randomized"),
                             2, hessian_bins=("1-3",), num_probes=4)  # fmt: skip
    names = [(c.bin, c.name) for c in grid.cells()]
    assert names[:6] == [
        ("1-3", "ef-s0"),
        ("1-3", "onehot-fixed-k4-s0"),
        ("1-3", "onehot-pool-k4-s0"),
        ("1-3", "onehot-randomized-k4-s0"),
        ("1-3", "orthogonal-randomized-k4-s0"),
        ("1-3", "efh-s0"),
    ]
    assert ("4-9", "efh-s0") not in names and ("4-9", "orthogonal-randomized-k4-s0") not in names
    assert len(names) == 2 * (6 + 3)  # fmt: skip
    paths = scaling.data_paths("d", "p")
    c = scaling.cell_config(scaling.ScaleCell("1-3", "rademacher", "pool", 1), phljax.Config(), str(tmp_path), paths)
    assert c.data == (os.path.join("d", "p-train-rademacher.h5"),) and c.select == ("size_bin=1-3",)
    assert (c.probe, c.probe_dist, c.probe_mode, c.num_probes, c.seed, c.split_seed) == (
        "random",
        "rademacher",
        "pool",
        1,
        1,
        1,
    )
    assert c.test_fraction == 0 and c.workdir == os.path.join(str(tmp_path), "1-3", "rademacher-pool-s1")
    c = scaling.cell_config(scaling.ScaleCell("1-3", "orthogonal", "randomized", 0, 4), phljax.Config(), "r", paths)
    assert c.data == (os.path.join("d", "p-train.h5"),) and (c.probe_dist, c.probe_mode, c.num_probes) == (
        "orthogonal", "randomized", 4)  # fmt: skip
    with pytest.raises(ValueError, match="regime"):
        scaling.ScaleCell("1-3", "ef", "pool", 0)
    with pytest.raises(ValueError, match="no stored pool"):
        scaling.ScaleCell("1-3", "orthogonal", "pool", 0)


@pytest.fixture(scope="module")
def tiny_scaling(tmp_path_factory):
    """Water (3 atoms) and ammonia + methane (4, 5) through the xTB builder (2 test + 4 training
    samples each, pools of 3), then 2 bins x {one-hot, Gaussian} pool regime x 2 seeds, 1 epoch."""
    cfg = scale.ScaleConfig(
        molecules=(scale.ScaleMolecule("water", "O", "tiny"), scale.ScaleMolecule("ammonia", "N", "tiny"),
                   scale.ScaleMolecule("methane", "C", "alkane")),
        n_nms=6, n_test_per_bin=4, train_hessian_max_atoms=0, pool_size=3, size_bins=(1, 4, 10),
    )  # fmt: skip
    root = tmp_path_factory.mktemp("scaling")
    cache, data = str(root / "cache"), str(root / "data")
    scale.run(cfg, cache)
    scale.assemble(cache, data, "tiny")
    base = phljax.Config(epochs=1, batch_size=2, progress=False, val_fraction=0.25, **TINY)
    grid = scaling.ScaleGrid(("1-3", "4-9"), ("onehot", "gaussian"), ("pool",), 2)
    out = str(root / "study")
    outcome = scaling.run_scaling(out, base, grid, scaling.data_paths(data, "tiny"), log=lambda s: None)
    return out, outcome


def test_mini_scaling_study_end_to_end(tiny_scaling):
    root, outcome = tiny_scaling
    assert len(outcome["trained"]) == 8 and not outcome["failed"]
    os.makedirs(os.path.join(root, "plots"), exist_ok=True)  # not a bin
    agg = scaling.aggregate(root)
    assert list(agg["bins"]) == ["1-3", "4-9"]
    evals = {}
    for b in ("1-3", "4-9"):
        for key in ("onehot-pool", "gaussian-pool"):
            for s in (0, 1):
                with open(os.path.join(root, b, f"{key}-s{s}", scaling.EVAL)) as f:
                    evals[b, key, s] = json.load(f)
    assert {g["n_atoms"] for s in (0, 1) for g in evals["4-9", "onehot-pool", s]["geometries"]} == {4, 5}
    for b in ("1-3", "4-9"):  # the paired statistics, by hand
        xa = np.array([evals[b, "onehot-pool", s]["hessian_rmse"] for s in (0, 1)])
        xb = np.array([evals[b, "gaussian-pool", s]["hessian_rmse"] for s in (0, 1)])
        pair = agg["bins"][b]["pairs"]["gaussian-pool vs onehot-pool"]
        assert pair["n_seeds"] == 2
        assert pair["hessian_rmse"]["change_pct"] == pytest.approx(100 * np.mean(xb - xa) / np.mean(xa))
        assert pair["hessian_rmse"]["p_value"] == pytest.approx(stats.ttest_rel(xb, xa).pvalue)
        cell = agg["bins"][b]["cells"]["onehot-pool"]["hessian_rmse"]
        assert cell["mean"] == pytest.approx(xa.mean()) and cell["std"] == pytest.approx(xa.std(ddof=1))
    # the RMSE of a cell from its rows: element-wise over the bin's test Hessians
    ev = evals["4-9", "gaussian-pool", 0]
    dof2 = sum((3 * g["n_atoms"]) ** 2 for g in ev["geometries"])
    h = np.sqrt(sum(g["hessian_sq_sum"] for g in ev["geometries"]) / dof2) / phljax.units.KCAL_MOL
    assert ev["hessian_rmse"] == pytest.approx(h)
    ex = agg["exponents"]["onehot-pool"]
    assert ex["gaussian_formula"]["n_points"] == 2 * (4 + 4) and np.isfinite(ex["onehot_over_gaussian"]["exponent"])
    # the gap trend: log(Gaussian / one-hot RMSE) of every (bin, seed) regressed on log(bin mean N)
    trend = agg["gap_trends"]["gaussian-pool vs onehot-pool"]
    x = [np.log(evals[b, "onehot-pool", s]["mean_atoms"]) for b in ("1-3", "4-9") for s in (0, 1)]
    y = [np.log(evals[b, "gaussian-pool", s]["hessian_rmse"] / evals[b, "onehot-pool", s]["hessian_rmse"])
         for b in ("1-3", "4-9") for s in (0, 1)]  # fmt: skip
    fit = stats.linregress(x, y)
    assert trend["n_bins"] == 2 and trend["hessian_rmse"]["n_points"] == 4
    assert trend["hessian_rmse"]["exponent"] == pytest.approx(fit.slope)
    assert trend["hessian_rmse"]["p_value"] == pytest.approx(fit.pvalue)
    assert trend["by_bin"]["4-9"]["hessian_rmse"] == pytest.approx(np.exp(np.mean(y[2:])))
    var = agg["bins"]["4-9"]["variance"]["onehot-pool"]  # geometric means over both seeds' geometries
    rows = [g for s in (0, 1) for g in evals["4-9", "onehot-pool", s]["geometries"]]
    assert var["n_geometries"] == len(rows) == 2 * 4
    ratio = [g["formula"]["onehot"] / g["formula"]["gaussian"] for g in rows]
    assert var["onehot_over_gaussian"] == pytest.approx(np.exp(np.mean(np.log(ratio))))
    rel = [g["formula"]["gaussian"] / g["trace"] ** 2 for g in rows]
    assert var["gaussian_relative"] == pytest.approx(np.exp(np.mean(np.log(rel))))
    k = [g["k_probe"]["orthogonal"] / g["k_probe"]["gaussian"] for g in rows]
    assert var["orthogonal_over_gaussian_k"] == pytest.approx(np.exp(np.mean(np.log(k)))) and max(k) < 1
    cell = agg["bins"]["4-9"]["cells"]["onehot-pool"]
    assert set(cell["plateau_exit"]) == {0, 1}  # one epoch each: never below 0.8 x itself
    assert cell["plateau_exit"][0] is None and "never" in scaling_report.plateau_table(agg)
    tables = scaling_report.render_tables(agg)
    assert "gaussian-pool vs onehot-pool" in tables and "p (exponent 0)" in tables
    # rerunning does nothing: every cell is evaluated
    with open(os.path.join(root, scaling.SETTINGS)) as f:
        paths = json.load(f)["paths"]
    base = phljax.Config(epochs=1, batch_size=2, progress=False, val_fraction=0.25, **TINY)
    grid = scaling.ScaleGrid(("1-3", "4-9"), ("onehot", "gaussian"), ("pool",), 2)
    again = scaling.run_scaling(root, base, grid, paths, log=lambda s: None)
    assert len(again["done"]) == 8 and not again["trained"]


def test_settings_keep_every_grid_run_on_the_root(tiny_scaling, tmp_path):
    root = str(tmp_path / "copy")
    shutil.copytree(tiny_scaling[0], root)
    with open(os.path.join(root, scaling.SETTINGS)) as f:
        first = json.load(f)
    base = phljax.Config(epochs=1, batch_size=2, progress=False, val_fraction=0.25, **TINY)
    part = scaling.ScaleGrid(("1-3",), ("onehot",), ("pool",), 1)  # its one cell is done
    assert not scaling.run_scaling(root, base, part, first["paths"], log=lambda s: None)["trained"]
    scaling.run_scaling(root, base, part, first["paths"], log=lambda s: None)
    with open(os.path.join(root, scaling.SETTINGS)) as f:
        grids = json.load(f)["grids"]
    assert grids == first["grids"] + [part.to_json()]  # once, not twice


def test_a_grid_run_waits_for_the_settings_lock(tiny_scaling, tmp_path):
    root = str(tmp_path / "copy")
    shutil.copytree(tiny_scaling[0], root)
    path = os.path.join(root, scaling.SETTINGS)
    with open(path) as f:
        paths = json.load(f)["paths"]
    base = phljax.Config(epochs=1, batch_size=2, progress=False, val_fraction=0.25, **TINY)
    part = scaling.ScaleGrid(("4-9",), ("gaussian",), ("pool",), 1)  # done: the run only records its grid
    run = threading.Thread(target=scaling.run_scaling, args=(root, base, part, paths), kwargs={"log": lambda s: None})
    with locked(path):  # another invocation is between reading and writing scaling.json
        run.start()
        run.join(0.5)
        assert run.is_alive()
        with open(path) as f:
            assert part.to_json() not in json.load(f)["grids"]
    run.join(60)
    assert not run.is_alive()
    with open(path) as f:
        assert json.load(f)["grids"][-1] == part.to_json()


def test_reevaluate_fills_missing_columns_with_the_same_numbers(tiny_scaling, tmp_path):
    root = str(tmp_path / "copy")
    shutil.copytree(tiny_scaling[0], root)
    with open(os.path.join(root, scaling.SETTINGS)) as f:
        paths = json.load(f)["paths"]
    assert scaling.reevaluate(root, paths, log=lambda s: None) == []  # every evaluation is current
    path = os.path.join(root, "4-9", "gaussian-pool-s1", scaling.EVAL)
    with open(path) as f:
        before = json.load(f)
    old = {**before, "geometries": [{k: v for k, v in g.items() if k != "k_probe"} for g in before["geometries"]]}
    with open(path, "w") as f:
        json.dump(old, f)  # an evaluation from before the K-probe columns
    os.remove(os.path.join(root, "1-3", "onehot-pool-s0", scaling.EVAL))  # trained, never evaluated
    assert scaling.reevaluate(root, paths, log=lambda s: None) == ["1-3/onehot-pool-s0", "4-9/gaussian-pool-s1"]
    with open(path) as f:
        after = json.load(f)
    for g0, g1 in zip(before["geometries"], after["geometries"], strict=True):
        assert g1["k_probe"] == pytest.approx(g0["k_probe"]) and g1["empirical"] == pytest.approx(g0["empirical"])


def test_amendment_reopens_only_the_cells_the_changed_rule_stopped(tiny_scaling, tmp_path):
    root = str(tmp_path / "copy")
    shutil.copytree(tiny_scaling[0], root)
    with open(os.path.join(root, scaling.SETTINGS)) as f:
        paths = json.load(f)["paths"]
    stopped = os.path.join(root, "4-9", "gaussian-pool-s1", "results.json")
    with open(stopped) as f:
        results = json.load(f)
    with open(stopped, "w") as f:
        json.dump({**results, "stopped": "early_stopping"}, f)  # as if early stopping had ended it
    base = phljax.Config(epochs=1, batch_size=2, progress=False, val_fraction=0.25, **TINY)
    with pytest.raises(ValueError, match="learning_rate"):  # not a resumable field: the trained cells would not match
        scaling.amend_settings(root, base.replace(learning_rate=0.5 * base.learning_rate), why="no")
    new = base.replace(early_stopping=0)
    amendment = scaling.amend_settings(root, new, why="plateau", log=lambda s: None)
    assert amendment["changed"] == {"early_stopping": [base.early_stopping, 0]}
    assert amendment["reopened"] == ["4-9/gaussian-pool-s1"]
    cell = os.path.dirname(stopped)
    assert sorted(f for f in os.listdir(cell) if f.endswith(scaling.SUPERSEDED)) == [
        "results.superseded.json", "scale_eval.superseded.json"]  # fmt: skip
    with open(os.path.join(root, scaling.SETTINGS)) as f:
        settings = json.load(f)
    assert settings["base"]["early_stopping"] == 0 and settings["amendments"][-1]["why"] == "plateau"
    with pytest.raises(ValueError, match="another base config"):  # the old base is refused from now on
        scaling.run_scaling(root, base, scaling.ScaleGrid(("4-9",), ("gaussian",), ("pool",), 2), paths)
    grid = scaling.ScaleGrid(("1-3", "4-9"), ("onehot", "gaussian"), ("pool",), 2)
    outcome = scaling.run_scaling(root, new, grid, paths, log=lambda s: None)
    assert outcome["trained"] == ["4-9/gaussian-pool-s1"] and os.path.exists(os.path.join(cell, scaling.EVAL))
    with pytest.raises(ValueError, match="nothing to amend"):
        scaling.amend_settings(root, new, why="again")


def test_results_md_block_is_rendered_from_the_aggregate_and_spliced_in_place(tiny_scaling):
    agg = scaling.aggregate(tiny_scaling[0])
    t = agg["gap_trends"]["gaussian-pool vs onehot-pool"]
    pool = t["pooled"]["hessian_rmse"]
    logs = []
    for b in ("1-3", "4-9"):
        for s in (0, 1):
            ev = {}
            for key in ("onehot-pool", "gaussian-pool"):
                with open(os.path.join(tiny_scaling[0], b, f"{key}-s{s}", scaling.EVAL)) as f:
                    ev[key] = json.load(f)["hessian_rmse"]
            logs.append(np.log(ev["gaussian-pool"] / ev["onehot-pool"]))
    assert pool["ratio"] == pytest.approx(np.exp(np.mean(logs))) and pool["n_points"] == 4
    assert pool["p_value"] == pytest.approx(stats.ttest_1samp(logs, 0.0).pvalue)
    block = scaling_report.render_results_md(agg, keys=("onehot-pool", "gaussian-pool"))
    assert block.startswith("Headline numbers") and "| 4-9 |" in block and "pooled ratio" in block
    text = f"# R\n\nprose\n\n{scaling_report.BEGIN}\n\nold numbers\n\n{scaling_report.END}\n\nmore prose\n"
    once = scaling_report.splice_results_md(text, block)
    assert "old numbers" not in once and block in once and once.endswith(f"{scaling_report.END}\n\nmore prose\n")
    assert scaling_report.splice_results_md(once, block) == once  # idempotent
    with pytest.raises(ValueError, match="BEGIN"):
        scaling_report.splice_results_md("no markers", block)


def test_a_warmup_amendment_restarts_the_cells_whose_rates_it_changes(tiny_scaling, tmp_path):
    root = str(tmp_path / "copy")
    shutil.copytree(tiny_scaling[0], root)
    with open(os.path.join(root, scaling.SETTINGS)) as f:
        paths = json.load(f)["paths"]
    cut = os.path.join(root, "1-3", "onehot-pool-s1")
    lines = [json.loads(line) for line in open(os.path.join(cut, "metrics.jsonl"))]
    with open(os.path.join(cut, "metrics.jsonl"), "w") as f:  # as if its rate had been cut in epoch 1
        f.writelines(json.dumps({**m, "lr": 0.5 * m["lr"]}) + "\n" for m in lines)
    base = phljax.Config(epochs=1, batch_size=2, progress=False, val_fraction=0.25, **TINY)
    amendment = scaling.amend_settings(root, base.replace(plateau_warmup=5), why="plateau", log=lambda s: None)
    assert amendment["restarted"] == ["1-3/onehot-pool-s1"] and amendment["reopened"] == []
    moved = cut + scaling.RESTARTED
    assert not os.path.exists(cut) and not os.path.exists(os.path.join(moved, "checkpoints"))
    assert {"metrics.jsonl", "results.json", scaling.EVAL} <= set(os.listdir(moved))  # the old run's record kept
    grid = scaling.ScaleGrid(("1-3", "4-9"), ("onehot", "gaussian"), ("pool",), 2)
    outcome = scaling.run_scaling(root, base.replace(plateau_warmup=5), grid, paths, log=lambda s: None)
    assert outcome["trained"] == ["1-3/onehot-pool-s1"]  # afresh; the moved folder is not a cell of the aggregate
    assert sum(c["n_seeds"] for c in scaling.aggregate(root)["bins"]["1-3"]["cells"].values()) == 4


def test_against_table_compares_the_seeds_both_cells_have():
    ef = {0: 2.0, 1: 2.2}
    hvp = {0: 1.0, 1: 1.3, 2: 0.2}  # seed 2 has no E-F partner: it must not move the change
    q = ("hessian_rmse", "forces_rmse", "energy_rmse")
    cell = lambda by_seed: {"n_seeds": len(by_seed), **{k: seed_stats(by_seed) for k in q}}  # noqa: E731
    st = paired({s: hvp[s] for s in ef}, ef)
    pair = {"n_seeds": 2, **{k: {"change_pct": st["rel_diff_pct"], "p_value": st["p_value"]} for k in q}}
    agg = {"bins": {"10-15": {"mean_atoms": 13.0, "cells": {"ef": cell(ef), "gaussian-fixed": cell(hvp)},
                              "pairs": {"gaussian-fixed vs ef": pair}}}}  # fmt: skip
    row = scaling_report._against(agg, "ef", ("gaussian-fixed",)).splitlines()[-1]
    assert f"{st['rel_diff_pct']:+.0f}% (p=" in row and "-45%" in row  # (1.15 - 2.1) / 2.1 over seeds 0-1
    del agg["bins"]["10-15"]["pairs"]["gaussian-fixed vs ef"]
    assert "-60%" in scaling_report._against(agg, "ef", ("gaussian-fixed",))  # no pair: 0.833 / 2.1 - 1, no p
