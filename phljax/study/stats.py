"""The study's statistics: mean and spread over seeds, paired t-tests of the paper's comparisons,
the tables in the layout of the paper's Tables 1 and 2, learning curves and time to a target.

Errors are read from `results.json["errors_kcal_mol"]`: energy kcal/mol, forces kcal/mol/A,
Hessian kcal/mol/A^2.

References:
    Rodriguez et al., "Projected Hessian Learning: Fast Curvature Supervision for Accurate
    Machine-Learning Interatomic Potentials", arXiv:2603.04523 (2026), Tables 1 and 2.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import numpy as np
from scipy import stats

from phljax.files import write_atomic
from phljax.study.grid import (
    _KEYS,
    _SINGLE_TEST_CATEGORY,
    PROTOCOLS,
    QUANTITIES,
    REGIMES,
    SUBSETS,
    UNITS,
    Cell,
    _label,
    cell_metrics,
    cell_results,
)  # fmt: skip
from phljax.units import KCAL_MOL


def comparison_pairs(regimes: Sequence[str] = REGIMES) -> list[tuple[str, str, str | None]]:
    """The paper's comparisons as (a, b, regime): a's change relative to the reference b.

    In each regime: random vs one-hot; each HVP scheme vs E-F-H and vs E-F. Then E-F-H vs E-F."""
    pairs = []
    for r in regimes:
        onehot, rand = f"efhvp-onehot-{r}", f"efhvp-random-{r}"
        pairs.append((rand, onehot, r))
        pairs += [(h, ref, r) for h in (onehot, rand) for ref in ("efh", "ef")]
    return [*pairs, ("efh", "ef", None)]


def _subsets(results: dict, protocol: str) -> dict[str, dict]:
    """results.json's kcal/mol errors by short subset name: 'test', 'rtp', 'irc', 'nms', ..."""
    errors = results.get("errors_kcal_mol", {})
    out = {
        "test" if name == "test" else name.removeprefix("test/"): d
        for name, d in errors.items()
        if name == "test" or name.startswith("test/")
    }
    category = _SINGLE_TEST_CATEGORY.get(protocol)
    if category and category not in out and "test" in out and len(out) == 1:
        out[category] = out["test"]  # older results.json: one category, reported as 'test' only
    return out


def _numeric(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _nan_to_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def seed_stats(by_seed: dict[int, float]) -> dict:
    """mean, sample std (ddof=1; None for n < 2), n, seeds and values over seeds."""
    seeds = sorted(by_seed)
    values = np.array([by_seed[s] for s in seeds], dtype=float)
    std = float(np.std(values, ddof=1)) if len(values) >= 2 else None
    return {
        "mean": _nan_to_none(float(np.mean(values))),
        "std": _nan_to_none(std),
        "n": len(seeds),
        "seeds": seeds,
        "values": [_nan_to_none(v) for v in values],
    }


def paired(a: dict[int, float], b: dict[int, float]) -> dict:
    """Paired comparison of a with reference b over the seeds both have.

    Returns:
        n, seeds, mean_diff (mean of a - b), rel_diff_pct (100 (mean a - mean b) / mean b) and
        p_value (two-sided paired t-test, `scipy.stats.ttest_rel`; None for n < 2 or zero spread).
    """
    seeds = sorted(set(a) & set(b))
    x, y = np.array([a[s] for s in seeds], float), np.array([b[s] for s in seeds], float)
    out = {"n": len(seeds), "seeds": seeds, "mean_diff": None, "rel_diff_pct": None, "p_value": None}
    if seeds:
        out["mean_diff"] = _nan_to_none(float(np.mean(x - y)))
        if np.mean(y) != 0:
            out["rel_diff_pct"] = _nan_to_none(float(100 * (np.mean(x) - np.mean(y)) / np.mean(y)))
    if len(seeds) >= 2:
        with np.errstate(divide="ignore", invalid="ignore"):
            out["p_value"] = _nan_to_none(float(stats.ttest_rel(x, y).pvalue))
    return out


def _collect(root: str) -> dict[str, dict[str, dict[int, dict]]]:
    """{protocol: {key: {seed: results}}} of the finished cells under `root`."""
    found: dict = {}
    for protocol in PROTOCOLS:
        folder = os.path.join(root, protocol)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            cell = Cell.parse(protocol, name)
            results = cell_results(cell.workdir(root)) if cell else None
            if results is not None:
                found.setdefault(protocol, {}).setdefault(cell.key, {})[cell.seed] = results
    return found


def _ordered(names, first: Sequence[str]) -> list[str]:
    return [n for n in first if n in names] + sorted(set(names) - set(first))


def aggregate(root: str) -> dict:
    """Statistics over seeds of every finished cell under `root`; written to `<root>/aggregate.json`.

    Returns:
        {"root", "units", "protocols": {protocol: {"description",
          "cells": {key: {"scheme", "probe", "regime", "seeds", "epochs_run": stats,
                          "mean_epoch_time_s": stats,
                          "subsets": {subset: {"n_molecules": [per seed], quantity: stats}}}},
          "pairs": {"<a> vs <b>": {"a", "b", "regime",
                                   "subsets": {subset: {quantity: paired}}}}}}}
        with stats = {mean, std (ddof=1), n, seeds, values} and paired = {n, seeds, mean_diff,
        rel_diff_pct, p_value} (`paired`). Subsets: 'test' and the categories ('rtp', 'irc',
        'nms', ...); quantities: the RMSEs and every other numeric key all of a cell's runs report
        for that subset, in kcal/mol units. NaN is written as null.
    """
    out = {"root": root, "units": UNITS, "protocols": {}}
    for protocol, keys in _collect(root).items():
        cells, values = {}, {}  # values[key][subset][quantity] = {seed: value}
        for key in _ordered(keys, list(_KEYS)):
            runs = keys[key]
            probe, regime = _KEYS[key]
            per_subset = {}
            subsets_of = {seed: _subsets(r, protocol) for seed, r in runs.items()}
            names = {name for subsets in subsets_of.values() for name in subsets}
            for subset in _ordered(names, SUBSETS):
                having = {seed: s[subset] for seed, s in subsets_of.items() if subset in s}
                common = set.intersection(*(set(k for k, v in d.items() if _numeric(v)) for d in having.values()))
                common.discard("n_molecules")
                values.setdefault(key, {})[subset] = {
                    q: {seed: float(d[q]) for seed, d in having.items()} for q in _ordered(common, QUANTITIES)
                }
                per_subset[subset] = {
                    "n_molecules": [having[s].get("n_molecules") for s in sorted(having)],
                    **{q: seed_stats(v) for q, v in values[key][subset].items()},
                }
            timing = {
                name: seed_stats({s: float(r[name]) for s, r in runs.items() if _numeric(r.get(name))})
                for name in ("epochs_run", "mean_epoch_time_s")
                if any(_numeric(r.get(name)) for r in runs.values())
            }
            cells[key] = {
                "scheme": _label(key),
                "probe": probe,
                "regime": regime,
                "seeds": sorted(runs),
                **timing,
                "subsets": per_subset,
            }
        pairs = {}
        for a, b, regime in comparison_pairs():
            if a not in values or b not in values:
                continue
            pairs[f"{a} vs {b}"] = {
                "a": a,
                "b": b,
                "regime": regime,
                "subsets": {
                    subset: {
                        q: paired(qa, values[b][subset][q]) for q, qa in quantities.items() if q in values[b][subset]
                    }
                    for subset, quantities in values[a].items()
                    if subset in values[b]
                },
            }
        out["protocols"][protocol] = {
            "description": PROTOCOLS[protocol],
            "cells": cells,
            "pairs": pairs,
            "time_to_target": time_to_target(root, protocol),
            "checkpoint_selection": checkpoint_selection(root, protocol),
        }
    write_atomic(os.path.join(root, "aggregate.json"), json.dumps(out, indent=2, allow_nan=False))
    return out


def time_to_target(root: str, protocol: str, quantity: str = "hessian_rmse") -> dict:
    """Training time and epochs each finished run needs to first reach a target validation RMSE.

    The target of a protocol is the loosest best validation `quantity` (kcal/mol units) of any run
    of a curvature scheme, so that every curvature run reaches it; E-F, which is not trained on
    it, is reported too. Time is the run's cumulative `epoch_time_s` (training steps,
    without validation) up to the first epoch whose `val_<quantity>` is at or below the target
    (validation errors are logged every `val_errors_every` epochs: that is the resolution).

    Returns:
        {"quantity", "target" (None: no curvature run has validation errors), "cells": {key:
        {"scheme", "reached": n, "runs": n, "epochs": stats, "train_time_s": stats}}} (stats over
        the seeds that reached the target, as `seed_stats`), and "efh_over_hvp_epoch_time": the paired
        per-seed ratio of E-F-H's mean epoch time to each HVP scheme's ({key: stats}).
    """
    column = f"val_{quantity}"
    runs: dict[str, dict[int, list[dict]]] = {}
    folder = os.path.join(root, protocol)
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        cell = Cell.parse(protocol, name)
        if cell and cell_results(cell.workdir(root)) is not None:
            runs.setdefault(cell.key, {})[cell.seed] = cell_metrics(cell.workdir(root))

    def best_of(lines):  # a run's best validation value, kcal/mol units
        return min(line[column] for line in lines if column in line) / KCAL_MOL

    best = {
        key: max(best_of(lines) for lines in seeds.values())
        for key, seeds in runs.items()
        if key != "ef" and all(any(column in line for line in lines) for lines in seeds.values())
    }
    target = max(best.values()) if best else None
    cells = {}
    for key in _ordered(runs, list(_KEYS)):
        reached = {}
        for seed, lines in runs[key].items():
            elapsed = 0.0
            for line in lines:
                elapsed += float(line.get("epoch_time_s", 0.0))
                if target is not None and column in line and line[column] / KCAL_MOL <= target:
                    reached[seed] = (float(line["epoch"]), elapsed)
                    break
        cells[key] = {
            "scheme": _label(key),
            "reached": len(reached),
            "runs": len(runs[key]),
            "epochs": seed_stats({s: e for s, (e, _) in reached.items()}) if reached else None,
            "train_time_s": seed_stats({s: t for s, (_, t) in reached.items()}) if reached else None,
        }
    ratios = {}
    if "efh" in runs:
        efh = {s: float(np.median([x["epoch_time_s"] for x in lines[1:] or lines])) for s, lines in runs["efh"].items()}
        for key in (k for k in runs if k.startswith("efhvp-")):
            hvp = {s: float(np.median([x["epoch_time_s"] for x in ls[1:] or ls])) for s, ls in runs[key].items()}
            common = sorted(set(efh) & set(hvp))
            if common:
                ratios[key] = seed_stats({s: efh[s] / hvp[s] for s in common})
    return {"quantity": quantity, "target": target, "cells": cells, "efh_over_hvp_epoch_time": ratios}


def checkpoint_selection(root: str, protocol: str, quantity: str = "energy_rmse") -> dict:
    """What choosing the checkpoint by validation loss costs in one validation RMSE (kcal/mol units).

    For each finished run: the validation `quantity` at the logged epoch nearest the best
    validation-loss epoch (the checkpoint that is evaluated), and its minimum over the run. If a
    curvature run's minimum at any epoch stays above E-F's selected value (same seed), the
    selection rule cannot explain its loss in that quantity.

    Returns:
        {"quantity", "cells": {key: {"at_selected": stats, "best_any_epoch": stats,
        "selection_cost": stats}}, "vs_ef": {key: stats of (best_any_epoch - E-F at_selected),
        paired seeds}} (stats as `seed_stats`).
    """
    column = f"val_{quantity}"
    per_key: dict[str, dict[int, tuple[float, float]]] = {}
    folder = os.path.join(root, protocol)
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        cell = Cell.parse(protocol, name)
        if not cell or cell_results(cell.workdir(root)) is None:
            continue
        lines = cell_metrics(cell.workdir(root))
        logged = [line for line in lines if column in line]
        if not logged:
            continue
        best = min(lines, key=lambda line: line["val_loss"])["epoch"]
        selected = min(logged, key=lambda line: abs(line["epoch"] - best))[column] / KCAL_MOL
        per_key.setdefault(cell.key, {})[cell.seed] = (selected, min(line[column] for line in logged) / KCAL_MOL)
    cells = {
        key: {
            "at_selected": seed_stats({s: a for s, (a, _) in seeds.items()}),
            "best_any_epoch": seed_stats({s: b for s, (_, b) in seeds.items()}),
            "selection_cost": seed_stats({s: a - b for s, (a, b) in seeds.items()}),
        }
        for key, seeds in ((k, per_key[k]) for k in _ordered(per_key, list(_KEYS)))
    }
    ef = per_key.get("ef", {})
    vs_ef = {}
    for key, seeds in per_key.items():
        common = sorted(set(seeds) & set(ef))
        if key != "ef" and common:
            vs_ef[key] = seed_stats({s: seeds[s][1] - ef[s][0] for s in common})
    return {"quantity": quantity, "cells": cells, "vs_ef": vs_ef}


def _selection_table(sel: dict | None) -> list[str]:
    if not sel or not sel["cells"]:
        return []
    q = sel["quantity"]
    out = [
        f"### Checkpoint selection: validation {q} at the selected (best validation loss) epoch and at "
        "its best epoch; last column: best-at-any-epoch minus E-F's selected value, paired seeds",
        "",
        "| scheme | n | selected | best at any epoch | selection cost | best any epoch - E-F selected |",
        "|---|---|---|---|---|---|",
    ]
    for key, c in sel["cells"].items():
        d = sel["vs_ef"].get(key)
        diff = "–" if d is None else f"{_num(d['mean'])} ± {_num(d['std'])} (min {_num(min(d['values']))})"
        out.append(f"| {_label(key)} | {c['at_selected']['n']} | {_num(c['at_selected']['mean'])} | "
                   f"{_num(c['best_any_epoch']['mean'])} | {_num(c['selection_cost']['mean'])} | {diff} |")  # fmt: skip
    return [*out, ""]


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:+.1f}%"


def _p(x: float | None) -> str:
    return "p=–" if x is None else f"p={x:.2g}"


#: column labels; energy_rel_rmse (each formula's mean error removed) where every run of a cell has it
_COLUMN_LABELS = {"energy_rmse": "E", "energy_rel_rmse": "E_rel", "forces_rmse": "F", "hessian_rmse": "H"}


def table_quantities(cells: dict) -> list[str]:
    """The quantities the tables and plots report for `aggregate(...)` cells of one protocol:
    QUANTITIES, with energy_rel_rmse after energy_rmse where any cell has it."""
    found = {q for cell in cells.values() for d in cell["subsets"].values() for q in d}
    return [q for q in _COLUMN_LABELS if q in QUANTITIES or q in found]


def _columns(protocol: dict) -> list[tuple[str, str]]:
    names = {s for cell in protocol["cells"].values() for s in cell["subsets"]}
    return [(s, q) for s in _ordered(names, SUBSETS) for q in table_quantities(protocol["cells"])]


def _header(columns: Sequence[tuple[str, str]], first: Sequence[str], last: Sequence[str] = ()) -> list[str]:
    names = [f"{s.upper() if s != 'test' else 'test'} {_COLUMN_LABELS[q]}" for s, q in columns]
    head = [*first, *names, *last]
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


def _scheme_table(protocol: dict, keys: Sequence[str], columns, min_seeds: int) -> list[str]:
    lines = _header(columns, ["scheme", "n"], ["epoch (s)"])
    for key in keys:
        cell = protocol["cells"].get(key)
        if cell is None:
            continue
        entries = []
        change = protocol["pairs"].get(f"{key} vs ef", {}).get("subsets", {})
        for subset, q in columns:
            st = cell["subsets"].get(subset, {}).get(q)
            if st is None:
                entries.append("–")
            elif st["n"] < min_seeds:
                entries.append(f"n={st['n']}, not reported")
            else:
                pair = change.get(subset, {}).get(q)
                vs = f" ({_pct(pair['rel_diff_pct'])})" if pair and pair["n"] >= min_seeds else ""
                entries.append(f"{_num(st['mean'])} ± {_num(st['std'])}{vs}")
        t = cell.get("mean_epoch_time_s")
        entries.append("–" if t is None else f"{_num(t['mean'])} ± {_num(t['std'])}")
        lines.append(f"| {cell['scheme']} | {len(cell['seeds'])} | " + " | ".join(entries) + " |")
    return lines


def _pair_entries(pair: dict, columns, min_seeds: int) -> list[str]:
    entries = []
    for subset, q in columns:
        st = pair["subsets"].get(subset, {}).get(q)
        if st is None:
            entries.append("–")
        elif st["n"] < min_seeds:
            entries.append(f"n={st['n']}, not reported")
        else:
            entries.append(f"{_pct(st['rel_diff_pct'])} ({_p(st['p_value'])})")
    return entries


def render_tables(agg: dict, min_seeds: int = 3) -> str:
    """Markdown tables of `aggregate(...)` in the layout of the paper's Tables 1 and 2, per protocol.

    Table 1 (randomized probes) and Table 2 (fixed probes): rows = schemes, columns = energy (E),
    force (F) and Hessian (H) test RMSE per test subset, mean ± sample std over seeds and, for
    all but E-F, the change relative to E-F (paired seeds); Table 2 adds the row "random vs
    one-hot" (change and paired t-test p). Then every comparison of `comparison_pairs` with its
    p-value. Entries over fewer than `min_seeds` seeds read "n=<n>, not reported".
    """
    out = []
    for name, protocol in agg["protocols"].items():
        columns = _columns(protocol)
        rel = "; E_rel: each formula's mean error removed" if any(q == "energy_rel_rmse" for _, q in columns) else ""
        out += [f"## Protocol `{name}`: {protocol['description']}", ""]
        out += [
            f"RMSE in kcal/mol (E{rel}), kcal/mol/A (F), kcal/mol/A^2 (H); mean ± std over seeds (ddof=1); "
            f"(change vs E-F, paired seeds); entries over < {min_seeds} seeds are not reported.",
            "",
        ]
        for number, regime in ((1, "randomized"), (2, "fixed")):
            keys = ["ef", f"efhvp-onehot-{regime}", f"efhvp-random-{regime}", "efh"]
            if not any(k in protocol["cells"] for k in keys[1:3]):
                continue
            out += [f"### Table {number}: {regime} probes", ""]
            out += _scheme_table(protocol, keys, columns, min_seeds)
            pair = protocol["pairs"].get(f"efhvp-random-{regime} vs efhvp-onehot-{regime}")
            if number == 2 and pair:
                n = min((st["n"] for d in pair["subsets"].values() for st in d.values()), default=0)
                out.append(
                    f"| random vs one-hot | {n} | " + " | ".join(_pair_entries(pair, columns, min_seeds)) + " | |"
                )
            out.append("")
        if protocol["pairs"]:
            out += ["### Pairwise comparisons: change of A relative to B (paired t-test p over common seeds)", ""]
            out += _header(columns, ["A vs B", "n"])
            for pair in protocol["pairs"].values():
                n = min((st["n"] for d in pair["subsets"].values() for st in d.values()), default=0)
                label = f"{_label(pair['a'])} vs {_label(pair['b'])}"
                out.append(f"| {label} | {n} | " + " | ".join(_pair_entries(pair, columns, min_seeds)) + " |")
            out.append("")
        out += _target_table(protocol.get("time_to_target"))
        out += _selection_table(protocol.get("checkpoint_selection"))
    return "\n".join(out)


def _target_table(ttt: dict | None) -> list[str]:
    if not ttt or ttt["target"] is None:
        return []
    out = [
        f"### Time to a validation Hessian RMSE of {ttt['target']:.3g} kcal/mol/A^2 (the loosest curvature "
        "run's best; training time, epoch times as measured by the study)",
        "",
        "| scheme | reached | epochs | training time (s) |",
        "|---|---|---|---|",
    ]
    for cell in ttt["cells"].values():
        e, t = cell["epochs"], cell["train_time_s"]
        epochs = "–" if e is None else f"{_num(e['mean'])} ± {_num(e['std'])}"
        time_s = "–" if t is None else f"{_num(t['mean'])} ± {_num(t['std'])}"
        out.append(f"| {cell['scheme']} | {cell['reached']}/{cell['runs']} | {epochs} | {time_s} |")
    for key, st in ttt["efh_over_hvp_epoch_time"].items():
        out.append(f"\nE-F-H / {_label(key)} epoch time (median epoch of each run, paired seeds, n = {st['n']}): "
                   f"{_num(st['mean'])} ± {_num(st['std'])}")  # fmt: skip
    return [*out, ""]


def _seed_mean(table: np.ndarray) -> np.ndarray:
    """Mean over axis 0 of the finite entries; NaN where there are none."""
    finite = np.isfinite(table)
    count = finite.sum(0)
    return np.where(count > 0, np.where(finite, table, 0.0).sum(0) / np.maximum(count, 1), np.nan)


def learning_curves(root: str) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """Seed-mean validation curves of every started cell, from metrics.jsonl.

    Returns:
        {protocol: {key: {"epoch": [n_epochs], "n_runs": [n_epochs] seeds that reached the epoch,
        "wall_time_s": [n_epochs] cumulative s, "val_loss": [n_epochs], and, when every run has
        validation errors in some lines, "energy_rmse" (kcal/mol), "forces_rmse" (kcal/mol/A),
        "hessian_rmse" (kcal/mol/A^2) from `val_*_rmse` (eV units), NaN at epochs without them}}}.
        Runs of different lengths (early stopping) are averaged over the seeds that reached each epoch.
    """
    rmse = {f"val_{q}": q for q in QUANTITIES}
    out: dict = {}
    for protocol in PROTOCOLS:
        folder = os.path.join(root, protocol)
        if not os.path.isdir(folder):
            continue
        groups: dict[str, list[list[dict]]] = {}
        for name in sorted(os.listdir(folder)):
            cell = Cell.parse(protocol, name)
            lines = cell_metrics(cell.workdir(root)) if cell else []
            if lines:
                groups.setdefault(cell.key, []).append(lines)
        for key in _ordered(groups, list(_KEYS)):
            runs = groups[key]
            columns = ["wall_time_s", "val_loss"]
            if all(any(all(k in line for k in rmse) for line in run) for run in runs):
                columns += list(rmse)
            length = max(len(run) for run in runs)
            curves = {
                "epoch": np.arange(1, length + 1),
                "n_runs": np.array([sum(len(r) > i for r in runs) for i in range(length)]),
            }
            for column in columns:
                table = np.full((len(runs), length), np.nan)
                for i, run in enumerate(runs):
                    v = np.array([line.get(column, np.nan) for line in run], dtype=float)
                    table[i, : len(v)] = np.cumsum(v) if column == "wall_time_s" else v
                curves[rmse.get(column, column)] = _seed_mean(table / KCAL_MOL if column in rmse else table)
            out.setdefault(protocol, {})[key] = curves
    return out
