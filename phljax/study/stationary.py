"""Item 5 of the study at every stationary point: frequencies, eigenvalues and the TS index.

The test split of the `random` protocol holds only a few of the reaction set's 36 RTP geometries
(12 reactants, 12 products, 12 transition states), and none of its TSs, so the stationary-point
metrics in each cell's `results.json` ("test/rtp") rest on 1-4 geometries per seed. Here every
finished cell's best model is evaluated on all of them, by kind of point:

- `all`, `minima` (reactants and products), `ts`: `phljax.evaluation.stationary_metrics`
  (harmonic frequency MAE in cm^-1 with translations and rotations projected out, Hessian
  eigenvalue MAE, the fraction of points with the right number of imaginary modes: 0 at a minimum,
  exactly 1 at a TS; the TS imaginary frequency error).

Most of these geometries were training data of most cells (`extrapolate` trains and validates on
RTP+IRC; `random` puts ~80% of them in training): these numbers measure how well each scheme's
supervision reproduces the curvature of points it saw (E-F saw only E and F there, HVP schemes one
or a few projections per step, E-F-H the whole Hessian); the held-out ones stay those of
`results.json` ("test/rtp"). The `reactions` protocol is the one that holds whole reactions, TSs
included, out.

    <root>/<protocol>/<cell>/stationary.json   one cell (kept; delete to redo)
    <root>/stationary.json                     stats over seeds and the paired comparisons
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from phljax.data import Molecule, bundled_path, load
from phljax.evaluation import STATIONARY, in_kcal_mol, reduce_stationary, stationary_rows
from phljax.files import write_atomic
from phljax.potential import Potential
from phljax.study.grid import _KEYS, PROTOCOLS, Cell, _label, cell_results
from phljax.study.stats import _ordered, comparison_pairs, paired, seed_stats

__all__ = [
    "STATIONARY_JSON",
    "KINDS",
    "METRICS",
    "evaluate_cell",
    "cell_stationary",
    "stationary_study",
    "render_stationary",
]

STATIONARY_JSON = "stationary.json"
#: point kinds -> the `meta['point']` values they hold
KINDS = {"all": tuple(STATIONARY), "minima": ("reactant", "product"), "ts": ("ts",)}
#: metrics in the order of the tables; eigenvalue MAE is converted to kcal/mol/A^2
METRICS = ("frequency_mae_cm1", "hessian_eigenvalue_mae", "stationary_index_correct", "ts_imaginary_frequency_mae_cm1")
DEFAULT_DATA = (bundled_path("chon_reactions-RTP.h5"),)


def evaluate_cell(workdir: str, points: Sequence[Molecule]) -> dict:
    """Stationary-point metrics of the best checkpoint in `workdir` on `points`, by kind.

    Args:
        points: stationary points (`meta['point']` in reactant, product, ts) with reference Hessians.
    Returns:
        {kind: `stationary_metrics` of the points of that kind, hessian_eigenvalue_mae in
        kcal/mol/A^2} for kind in `KINDS`.
    """
    rows = stationary_rows(Potential.from_workdir(workdir), points)  # every model Hessian once
    return in_kcal_mol({kind: reduce_stationary([r for r in rows if r["point"] in p]) for kind, p in KINDS.items()})


def cell_stationary(root: str, cell: Cell, points: Sequence[Molecule]) -> dict | None:
    """A finished cell's stationary metrics, computed once and kept in its work directory."""
    workdir = cell.workdir(root)
    if cell_results(workdir) is None:
        return None
    path = os.path.join(workdir, STATIONARY_JSON)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    out = evaluate_cell(workdir, points)
    write_atomic(path, json.dumps(out, indent=2))
    return out


def stationary_study(
    root: str, paths: Sequence[str] = DEFAULT_DATA, protocols: Sequence[str] = tuple(PROTOCOLS)
) -> dict:
    """Every finished cell on every stationary point in `paths`; stats over seeds and the paired
    comparisons of `phljax.study.stats.comparison_pairs`, written to `<root>/stationary.json`.

    Returns:
        {"data", "n_points": {kind: n}, "protocols": {protocol: {"cells": {key: {"scheme",
          "seeds", kind: {metric: stats}}}, "pairs": {"<a> vs <b>": {kind: {metric: paired}}}}}}
    """
    points = [m for m in load(list(paths)) if m.meta.get("point") in STATIONARY and m.hessian is not None]
    if not points:
        raise ValueError(f"no stationary points with Hessians in {list(paths)}")
    out = {
        "data": list(paths),
        "n_points": {kind: sum(m.meta["point"] in p for m in points) for kind, p in KINDS.items()},
        "units": {"hessian_eigenvalue_mae": "kcal/mol/A^2", "frequency_mae_cm1": "cm^-1"},
        "protocols": {},
    }
    for protocol in protocols:
        folder = os.path.join(root, protocol)
        if not os.path.isdir(folder):
            continue
        values: dict = {}  # values[key][kind][metric] = {seed: value}
        for name in sorted(os.listdir(folder)):
            cell = Cell.parse(protocol, name)
            found = cell_stationary(root, cell, points) if cell else None
            if found is None:
                continue
            for kind in KINDS:
                for metric in METRICS:
                    if metric in found.get(kind, {}):
                        values.setdefault(cell.key, {}).setdefault(kind, {}).setdefault(metric, {})[cell.seed] = float(
                            found[kind][metric]
                        )
        cells = {
            key: {
                "scheme": _label(key),
                "seeds": sorted({s for m in values[key]["all"].values() for s in m}),
                **{kind: {m: seed_stats(v) for m, v in by_kind.items()} for kind, by_kind in values[key].items()},
            }
            for key in _ordered(values, list(_KEYS))
        }
        pairs = {
            f"{a} vs {b}": {
                kind: {m: paired(v, values[b][kind][m]) for m, v in by_kind.items() if m in values[b].get(kind, {})}
                for kind, by_kind in values[a].items()
            }
            for a, b, _ in comparison_pairs()
            if a in values and b in values
        }
        out["protocols"][protocol] = {"cells": cells, "pairs": pairs}
    write_atomic(os.path.join(root, STATIONARY_JSON), json.dumps(out, indent=2, allow_nan=False))
    return out


def _cell(stats: dict | None, digits: int = 1, scale: float = 1.0) -> str:
    if not stats or stats.get("mean") is None:
        return "–"
    mean = stats["mean"] * scale
    std = "" if stats.get("std") is None else f" ± {stats['std'] * scale:.{digits}f}"
    return f"{mean:.{digits}f}{std}"


def render_stationary(agg: dict, min_seeds: int = 3) -> str:
    """Markdown tables: per protocol, the schemes' metrics at all points and at the TSs (mean ± std
    over seeds, cells with >= `min_seeds` seeds; index fractions in %), then the paired comparisons
    (A - B, relative change, paired t-test p; index fractions in percentage points)."""
    n = agg["n_points"]
    lines = []
    for protocol, d in agg["protocols"].items():
        lines += [
            f"### Protocol `{protocol}`: all {n['all']} stationary points ({n['minima']} minima, {n['ts']} TSs)",
            "",
            "| scheme | n | freq MAE (cm^-1) | eig MAE (kcal/mol/A^2) | index right, all | "
            "freq MAE, TS | TSs with one imaginary mode | TS imag. freq error (cm^-1) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in d["cells"].values():
            if len(c["seeds"]) < min_seeds:
                continue
            a, ts = c.get("all", {}), c.get("ts", {})
            lines.append(
                f"| {c['scheme']} | {len(c['seeds'])} | {_cell(a.get('frequency_mae_cm1'), 0)} "
                f"| {_cell(a.get('hessian_eigenvalue_mae'), 1)} | {_cell(a.get('stationary_index_correct'), 0, 100)}% "
                f"| {_cell(ts.get('frequency_mae_cm1'), 0)} | {_cell(ts.get('stationary_index_correct'), 0, 100)}% "
                f"| {_cell(ts.get('ts_imaginary_frequency_mae_cm1'), 0)} |"
            )
        lines += [
            "",
            "| A vs B | n | freq MAE, all | eig MAE, all | index right, all | freq MAE, TS | TS index right |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, p in d["pairs"].items():
            a, ts = p.get("all", {}), p.get("ts", {})
            entries = [
                (a.get(m), m) for m in ("frequency_mae_cm1", "hessian_eigenvalue_mae", "stationary_index_correct")
            ] + [(ts.get(m), m) for m in ("frequency_mae_cm1", "stationary_index_correct")]
            n_pair = max((e["n"] for e, _ in entries if e), default=0)
            if n_pair < min_seeds:
                continue
            lines.append(f"| {_label_pair(name)} | {n_pair} | " + " | ".join(_pair(e, m) for e, m in entries) + " |")
        lines.append("")
    return "\n".join(lines)


def _label_pair(name: str) -> str:
    a, b = name.split(" vs ")
    return f"{_label(a)} vs {_label(b)}"


def _pair(e: dict | None, metric: str) -> str:
    """'diff (rel%), p' ; the index fraction as a difference in percentage points."""
    if not e or e.get("mean_diff") is None:
        return "–"
    p = "" if e.get("p_value") is None else f", p = {e['p_value']:.2g}"
    if metric == "stationary_index_correct":
        return f"{100 * e['mean_diff']:+.0f} pts{p}"
    rel = "" if e.get("rel_diff_pct") is None else f" ({e['rel_diff_pct']:+.0f}%)"
    return f"{e['mean_diff']:+.0f}{rel}{p}"
