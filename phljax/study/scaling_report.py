"""The size-scaling study's report: Markdown tables of :func:`phljax.study.scaling.aggregate`'s
output, the headline sentences, and RESULTS.md's generated block (between :data:`BEGIN` and
:data:`END`, rewritten by ``experiments/scaling.py --aggregate --results-md RESULTS.md``). Every
number comes from the aggregate; nothing here reads cells."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from phljax.study.scaling import PAIRS, PLATEAU_EXIT, QUANTITIES

#: the cell keys RESULTS.md's variance and exponent tables keep (:func:`render_results_md`)
HEADLINE_KEYS = ("ef", "gaussian-fixed", "onehot-fixed")
# the references HVP schemes are held against, and those schemes, as PAIRS compares them
AGAINST = {ref: tuple(b for a, b in PAIRS if a == ref) for ref in ("ef", "efh")}
LABELS = {"ef": "E-F", "efh": "E-F-H"}


def _pct_p(x: dict) -> str:  # "change | p"; None (no spread, zero mean) reads "–"
    change = "–" if x["change_pct"] is None else f"{x['change_pct']:+.1f}%"
    return change + " | " + ("–" if x["p_value"] is None else f"{x['p_value']:.3f}")


def _ci(fit: dict, fmt: str) -> str:  # "[lo, hi]"; "–" without an interval (fewer than 3 points)
    return "–" if fit["ci95"] is None else f"[{fit['ci95'][0]:{fmt}}, {fit['ci95'][1]:{fmt}}]"


def _fmt(x: float | None, fmt: str) -> str:
    return "–" if x is None else f"{x:{fmt}}"


def _p(p: float | None) -> str:
    return _fmt(p, ".2g")


def _mean_std(c: dict | None, q: str, fmt: str = ".2f") -> str:  # "mean ± std (n=k)" of a cell's quantity
    if not c:
        return "–"
    x = c[q]
    return f"{x['mean']:{fmt}}" + (f" ± {x['std']:{fmt}}" if x["std"] is not None else "") + f" (n={c['n_seeds']})"


def rmse_table(agg: dict[str, Any], q: str = "hessian_rmse") -> str:
    """Test RMSE of ``q`` per bin (rows) and cell key (columns), mean ± std over seeds (n)."""
    keys = sorted({k for b in agg["bins"].values() for k in b["cells"]})
    lines = ["| bin | mean N | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for b, entry in agg["bins"].items():
        cells = " | ".join(_mean_std(entry["cells"].get(k), q) for k in keys)
        lines.append(f"| {b} | {entry['mean_atoms']:.0f} | {cells} |")
    return "\n".join(lines)


def pairs_table(agg: dict[str, Any]) -> str:
    """Paired t-tests over seeds per bin and pair of :data:`PAIRS` (bins with >= 2 seeds of both)."""
    lines = ["| bin | comparison | n | H change | p | F change | p | E change | p |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for b, entry in agg["bins"].items():
        for name, p in entry["pairs"].items():
            q = [p[k] for k in ("hessian_rmse", "forces_rmse", "energy_rmse")]
            lines.append(f"| {b} | {name} | {p['n_seeds']} | " + " | ".join(_pct_p(x) for x in q) + " |")
    return "\n".join(lines)


def variance_table(agg: dict[str, Any], keys: Sequence[str] | None = None) -> str:
    """Per bin and training scheme (``keys``; default all): :func:`variance_summary`'s ratios."""
    lines = ["| bin | mean N | trained as | geometries | Var one-hot / Gaussian | Var Rademacher / Gaussian | "
             "relative Var Gaussian | relative Var one-hot | MC / closed form (one-hot, Gaussian) | "
             "Var K = 4 orthogonal / i.i.d. Gaussian |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for b, entry in agg["bins"].items():
        for key, v in entry.get("variance", {}).items():
            if keys is None or key in keys:
                lines.append(f"| {b} | {entry['mean_atoms']:.0f} | {key} | {v['n_geometries']} | "
                             f"{v['onehot_over_gaussian']:.2f} | {v['rademacher_over_gaussian']:.2f} | "
                             f"{v['gaussian_relative']:.3g} | {v['onehot_relative']:.3g} | "
                             f"{v['onehot_empirical_over_formula']:.2f}, "
                             f"{v['gaussian_empirical_over_formula']:.2f} | "
                             f"{_fmt(v.get('orthogonal_over_gaussian_k'), '.2f')} |")  # fmt: skip
    return "\n".join(lines)


def plateau_table(agg: dict[str, Any], keys: Sequence[str] | None = None) -> str:
    """Per bin and cell key (``keys``; default all): the epoch each seed's model left the initial
    loss plateau (:func:`phljax.study.scaling.plateau_exit`; "never" within its run)."""
    keys = sorted({k for b in agg["bins"].values() for k in b["cells"]} if keys is None else keys)
    lines = ["| bin | mean N | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for b, entry in agg["bins"].items():
        row = []
        for k in keys:
            exits = sorted(entry["cells"].get(k, {}).get("plateau_exit", {}).items(), key=lambda kv: int(kv[0]))
            row.append(", ".join("never" if e is None else str(e) for _, e in exits) or "–")
        lines.append(f"| {b} | {entry['mean_atoms']:.0f} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def exponent_table(agg: dict[str, Any], keys: Sequence[str] | None = None) -> str:
    """The exponents of N per training scheme (``keys``; default all) and quantity."""
    lines = ["| trained as | quantity | exponent of N | 95% CI | points |", "|---|---|---|---|---|"]
    for key, ex in agg["exponents"].items():
        if keys is None or key in keys:
            for q, fit in ex.items():
                lines.append(f"| {key} | {q} | {fit['exponent']:.2f} | {_ci(fit, '.2f')} | {fit['n_points']} |")
    return "\n".join(lines)


def trend_table(agg: dict[str, Any]) -> str:
    """Per compared pair and quantity: the ratio b / a per bin, its exponent of N and its pooled
    geometric mean over every (bin, seed) (:func:`gap_trend`, :func:`pooled_ratio`)."""
    lines = ["| comparison (ratio b / a) | quantity | ratio per bin (mean N: geometric mean over seeds) | "
             "exponent of N | 95% CI | p (exponent 0) | pooled ratio [95% CI] | p (ratio 1) | points |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, t in agg.get("gap_trends", {}).items():
        for q in QUANTITIES:
            per_bin = ", ".join(f"{e['mean_atoms']:.0f}: {e[q]:.2f}" for e in t["by_bin"].values())
            fit, pool = t[q], t["pooled"][q]
            lines.append(f"| {name} | {q} | {per_bin} | {fit['exponent']:+.3f} | {_ci(fit, '+.3f')} | "
                         f"{_p(fit['p_value'])} | {pool['ratio']:.2f} {_ci(pool, '.2f')} | {_p(pool['p_value'])} | "
                         f"{fit['n_points']} |")  # fmt: skip
    return "\n".join(lines)


def render_tables(agg: dict[str, Any]) -> str:
    """Markdown: test Hessian RMSE per bin and scheme (mean ± std, n), the pair tests, the estimator
    variances per bin, the exponents, the gap trends (every scheme)."""
    parts = [rmse_table(agg), pairs_table(agg), variance_table(agg), exponent_table(agg)]
    return "\n\n".join(parts + ([trend_table(agg)] if agg.get("gap_trends") else []))


def _against(agg: dict[str, Any], ref: str, keys: Sequence[str]) -> str:
    """Per bin: ``ref``'s E, F, H RMSE (mean over seeds, n) and each key's change of the mean
    against it: over the seeds both have, with the paired test's p, where they share >= 2 seeds;
    else over all seeds of each, without p."""
    head = ["bin", "mean N"]
    for q in ("H", "F", "E"):
        head += [f"{ref} {q}"] + [f"{k} {q}" for k in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b, entry in agg["bins"].items():
        base = entry["cells"].get(ref)
        if not base or not all(k in entry["cells"] for k in keys):
            continue
        row = [b, f"{entry['mean_atoms']:.0f}"]
        for q in ("hessian_rmse", "forces_rmse", "energy_rmse"):
            row.append(_mean_std(base, q))
            for k in keys:
                pair = entry["pairs"].get(f"{k} vs {ref}")
                if pair and pair[q]["change_pct"] is not None:  # the seeds both have, as the p-value
                    row.append(f"{pair[q]['change_pct']:+.0f}% (p={_p(pair[q]['p_value'])})")
                else:
                    row.append(f"{100 * (entry['cells'][k][q]['mean'] / base[q]['mean'] - 1):+.0f}%")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _range(values: Sequence[float], fmt: str = ".2f") -> str:
    lo, hi = min(values), max(values)
    return f"{lo:{fmt}}" if f"{lo:{fmt}}" == f"{hi:{fmt}}" else f"{lo:{fmt}}-{hi:{fmt}}"


def headline(agg: dict[str, Any], keys: Sequence[str] = HEADLINE_KEYS) -> str:
    """The section's numbers in sentences: cells per key, the one-hot/Gaussian accuracy gap and its
    trend, the variance ratio at the smallest and largest bin and its exponents, HVP against E-F."""
    bins = agg["bins"]
    lines = []
    counts: dict[str, dict[str, int]] = {}
    for b, entry in bins.items():
        for k, c in entry["cells"].items():
            counts.setdefault(k, {})[b] = c["n_seeds"]
    lines.append("- Cells evaluated (seeds per bin): " + "; ".join(
        f"{k} " + ", ".join(f"{b}: {n}" for b, n in v.items()) for k, v in sorted(counts.items())) + ".")  # fmt: skip
    t = agg.get("gap_trends", {}).get("gaussian-fixed vs onehot-fixed")
    if t:
        h, pool = t["hessian_rmse"], t["pooled"]["hessian_rmse"]
        per_bin = ", ".join(f"{e['mean_atoms']:.0f} atoms {e['hessian_rmse']:.2f}" for e in t["by_bin"].values())
        lines.append(
            f"- Gaussian / one-hot test Hessian RMSE (fixed regime, geometric mean over seeds): {per_bin}; "
            f"exponent of N **{h['exponent']:+.3f} {_ci(h, '+.3f')}, p = {_p(h['p_value'])}** over "
            f"{h['n_points']} (bin, seed) pairs in {t['n_bins']} bins; pooled ratio {pool['ratio']:.2f} "
            f"{_ci(pool, '.2f')} (p = {_p(pool['p_value'])}). Forces: exponent {t['forces_rmse']['exponent']:+.3f} "
            f"(p = {_p(t['forces_rmse']['p_value'])}); energies {t['energy_rmse']['exponent']:+.3f} "
            f"(p = {_p(t['energy_rmse']['p_value'])})."
        )  # fmt: skip
    first, last = next(iter(bins.values())), list(bins.values())[-1]
    ends = [(e["mean_atoms"], [v["onehot_over_gaussian"] for k, v in e.get("variance", {}).items() if k in keys])
            for e in (first, last)]  # fmt: skip
    if all(v for _, v in ends):
        exps = ", ".join(f"{k} {agg['exponents'][k]['onehot_over_gaussian']['exponent']:.2f} "
                         f"{_ci(agg['exponents'][k]['onehot_over_gaussian'], '.2f')}"
                         for k in keys if k in agg["exponents"])  # fmt: skip
        lines.append(
            f"- Var one-hot / Var Gaussian (closed forms, trained models' test error matrices): "
            f"{_range(ends[0][1])} at {ends[0][0]:.0f} atoms, {_range(ends[1][1])} at {ends[1][0]:.0f} atoms; "
            f"exponent of N (trained as: exponent [95% CI]): {exps}."
        )
    for ref, k in ((r, k) for r, ks in AGAINST.items() for k in ks):
        t = agg.get("gap_trends", {}).get(f"{k} vs {ref}")
        if t:
            h, pool = t["hessian_rmse"], t["pooled"]["hessian_rmse"]
            lines.append(
                f"- {k} / {LABELS[ref]} test Hessian RMSE: pooled {pool['ratio']:.2f} {_ci(pool, '.2f')} (p = "
                f"{_p(pool['p_value'])}, {pool['n_points']} (bin, seed) pairs); exponent of N {h['exponent']:+.3f} "
                f"{_ci(h, '+.3f')} (p = {_p(h['p_value'])}). Forces pooled {t['pooled']['forces_rmse']['ratio']:.2f} "
                f"(p = {_p(t['pooled']['forces_rmse']['p_value'])}), energies "
                f"{t['pooled']['energy_rmse']['ratio']:.2f} (p = {_p(t['pooled']['energy_rmse']['p_value'])})."
            )  # fmt: skip
    return "\n".join(lines)


def render_results_md(agg: dict[str, Any], keys: Sequence[str] = HEADLINE_KEYS) -> str:
    """RESULTS.md's generated block of the scaling section: :func:`headline`, the RMSE table, the
    pair tests, HVP against E-F, orthogonal against i.i.d. at K = 4, the variance and exponent
    tables (rows of ``keys``) and the gap trends. Every number in it comes from ``agg``."""
    parts = [
        "Headline numbers:\n\n" + headline(agg, keys),
        "Test Hessian RMSE (kcal/mol/A^2; mean ± std over seeds, n):\n\n" + rmse_table(agg),
        "Paired t-tests over seeds (bins with 2 or more seeds of both; change of b's mean against a's):\n\n"
        + pairs_table(agg),
        "HVP (fixed regime, K = 1, Hessian-free labels) against E-F (H in kcal/mol/A^2, F in kcal/mol/A, E in "
        "kcal/mol; HVP columns: change of the mean against E-F's over the seeds both have, with the paired test's p, "
        "where they share 2 or more; else over all seeds, without p):\n\n" + _against(agg, "ef", AGAINST["ef"]),
        "HVP against E-F-H, in the bins whose training samples carry Hessians (fixed regime: one stored probe and "
        "its HVP per sample, no Hessian; randomized regime, K = 4: new Gaussian probes every step on the training "
        "Hessians; columns as in the table above):\n\n" + _against(agg, "efh", AGAINST["efh"]),
        "Orthogonal against i.i.d. Gaussian probes at K = 4 (randomized regime; test RMSE, mean ± std over "
        "seeds):\n\n" + _against(agg, "gaussian-randomized-k4", ("orthogonal-randomized-k4",)),
        "Epoch at which each model left the initial loss plateau (train force loss below "
        f"{PLATEAU_EXIT} x its epoch-1 value; seeds in order):\n\n" + plateau_table(agg, keys),
        "Estimator variances per bin (geometric means over the bin's test geometries and seeds; the last column "
        "only for models evaluated with the K-probe columns):\n\n" + variance_table(agg, keys),
        'Exponents of N over every test geometry (closed form unless "empirical"; "relative" = over tr(A)^2; '
        "orthogonal_over_gaussian_k = K = 4 orthogonalised over K = 4 i.i.d. Gaussian probes):\n\n"
        + exponent_table(agg, keys),
    ]
    if agg.get("gap_trends"):
        parts.append('Trends of each compared pair (ratio b / a over (bin, seed) pairs; `aggregate.json` "gap_trends"; '
                     "pooled = geometric mean over all of them):\n\n" + trend_table(agg))  # fmt: skip
    return "\n\n".join(parts)


BEGIN = "<!-- BEGIN generated by experiments/scaling.py --aggregate --results-md (edit the code, not this block) -->"
END = "<!-- END generated -->"


def splice_results_md(text: str, block: str) -> str:
    """``text`` with what lies between :data:`BEGIN` and :data:`END` replaced by ``block``."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"expected one {BEGIN!r} ... {END!r} pair")
    head, rest = text.split(BEGIN)
    return head + BEGIN + "\n\n" + block + "\n\n" + END + rest.split(END, 1)[1]
