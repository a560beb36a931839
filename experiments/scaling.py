"""The size-scaling study: per size bin, E-F and E-F-HVP (one-hot, Gaussian, Rademacher; fixed and pool
regimes) on the xTB scaling set's Hessian-free labels, and the one-probe estimator's variance on the
trained models' error matrices against N (`phljax.study.scaling`).

    python experiments/make_scale_data.py --assemble           # the set's files from its cache
    nohup nice -n 10 python experiments/scaling.py --root results/scaling --seeds 3 --channels 8 --lmax 1 \\
        --epochs 200 --batch-size 8 --lr-patience 10 --min-lr-scale 0.03125 --early-stopping 0 \\
        --plateau-warmup 75 --no-progress --keep-going >> results/scaling/log.txt 2>&1 &   # the root's base flags
    python experiments/scaling.py --root results/scaling --status
    touch results/scaling/STOP                                   # stop after the cell in flight
    python experiments/scaling.py --root results/scaling --aggregate --plots results/scaling/plots

Any run.py option sets the base config of every cell; the study sets each cell's bin (`--select
size_bin=...`), training file, scheme, probes and seed. Bins: every complete bin of
`<prefix>-bins.json` (written by `--assemble`; or `--bins`, which must be complete); E-F-H
(`--schemes ... efh`) and the `randomized` regime run only in `--hessian-bins` (bins whose
training samples have Hessians). Orthogonal against i.i.d. Gaussian probes at equal K:

    python experiments/scaling.py --root results/scaling --schemes gaussian orthogonal --regimes randomized \
        --num-probes 4 --bins 10-15 16-24 25-39 --hessian-bins 10-15 16-24 25-39 ... (the same base flags)

A cell is done when `<root>/<bin>/<cell>/scale_eval.json` exists. `--aggregate --results-md RESULTS.md`
rewrites RESULTS.md's generated block (between its BEGIN/END markers) from the aggregate. A stopping rule
of the base config can change on a root with trained cells only by an amendment, recorded in scaling.json:

    python experiments/scaling.py --root results/scaling <the base flags, one changed> --amend "why"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import numpy as np

from phljax.config import Config, config_parser, parse_args
from phljax.files import write_atomic
from phljax.study import scaling, scaling_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scaling_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False, add_help=False
    )
    p.add_argument("-h", "--help", action="store_true", help="this help and run.py's options")
    p.add_argument("--root", default="results/scaling")
    p.add_argument("--data-dir", default=os.path.join(ROOT, "data", "scale"), help="the scaling set's HDF5 files")
    p.add_argument("--prefix", default="xtb_scale")
    p.add_argument("--bins", nargs="+", help="size bins (default: every bin of the test file)")
    p.add_argument(
        "--schemes", nargs="+", default=["ef", "onehot", "gaussian", "rademacher"], choices=list(scaling.SCHEMES)
    )
    p.add_argument("--regimes", nargs="+", default=["fixed", "pool"], choices=list(scaling.REGIMES))
    p.add_argument("--hessian-bins", nargs="*", default=[],
                   help="bins with training Hessians: E-F-H and the randomized regime run there")  # fmt: skip
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--num-probes", type=int, default=1, help="K of the HVP schemes (cells of K != 1: -k<K>)")
    p.add_argument("--keep-going", action="store_true", help="record a failing cell and go on")
    p.add_argument("--status", action="store_true", help="print which cells are done, then exit")
    p.add_argument(
        "--reevaluate", action="store_true", help="evaluate again trained cells whose scale_eval.json is out of date"
    )
    p.add_argument("--aggregate", action="store_true", help="write <root>/aggregate.json, print the tables, exit")
    p.add_argument("--plots", metavar="DIR", help="with --aggregate: PNGs into DIR")
    p.add_argument("--label-cost", metavar="JSON", help="with --plots: label_cost.py --level xtb's output, plotted")
    p.add_argument("--memory", metavar="JSON", help="with --plots: training_cost.py --molecules --compile-only output")
    p.add_argument("--results-md", metavar="MD", help="with --aggregate: rewrite MD's generated scaling block in place")
    p.add_argument(
        "--amend", metavar="WHY",
        help="change the root's base config to this one's (resumable fields only), recorded with WHY; cells that "
             "stopped because of a changed field are reopened, those whose logged rates a changed "
             "--plateau-warmup would change are restarted; then exit",
    )  # fmt: skip
    return p


def plot(agg: dict, root: str, out_dir: str, label_cost: str | None = None, memory: str | None = None) -> list[str]:
    """rmse-vs-n.png (test E, F, H RMSE per bin, mean ± std over seeds, per scheme),
    variance-vs-n.png (closed-form one-probe variance per test geometry and family, E-F-trained
    models or else the scheme evaluated on most geometries, log-log, with the fitted exponents),
    gap-vs-n.png (the RMSE ratio of each compared pair per bin, and the one-hot/Gaussian variance
    ratio per test geometry for every trained scheme, against N), and from the given JSONs label-cost-vs-n.png
    (seconds per geometry: FD Hessian against K FD HVPs) and memory-vs-n.png (XLA peak bytes of
    one training step: E-F, HVP K=1, E-F-H all columns at once and chunked)."""
    import matplotlib  # noqa: PLC0415 (optional: the dev extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    os.makedirs(out_dir, exist_ok=True)
    paths = []

    def save(fig, name: str) -> str:
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=120)
        plt.close(fig)
        return os.path.join(out_dir, name)

    bins = agg["bins"]
    keys = sorted({k for b in bins.values() for k in b["cells"]})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, q in zip(axes, ("energy_rmse", "forces_rmse", "hessian_rmse"), strict=True):
        for k in keys:
            pts = [(b["mean_atoms"], b["cells"][k][q]) for b in bins.values() if k in b["cells"]]
            if pts:
                n, st = zip(*pts, strict=True)
                ax.errorbar(
                    n, [s["mean"] for s in st], yerr=[s["std"] or 0 for s in st], marker="o", capsize=2, label=k
                )
        ax.set(xscale="log", xlabel="atoms (bin mean)", ylabel=f"test {q}")
    axes[0].legend(fontsize="small")
    fig.suptitle("scaling set: test RMSE per size bin (kcal/mol units), mean ± std over seeds")
    paths.append(save(fig, "rmse-vs-n.png"))
    geoms = scaling.geometries_by_scheme(root)
    if geoms:  # the E-F models' error matrices, else those of the scheme evaluated on most geometries
        key = "ef" if "ef" in geoms else max(geoms, key=lambda k: (len(geoms[k]), k))
        rows = geoms[key]
        fig, ax = plt.subplots(figsize=(6, 4.5))
        n = [g["n_atoms"] for g in rows]
        for fam in scaling.FAMILIES:
            fit = agg["exponents"][key][f"{fam}_formula"]
            ax.loglog(n, [g["formula"][fam] for g in rows], "o", ms=3, alpha=0.6,
                      label=f"{fam}: N^{fit['exponent']:.2f}")  # fmt: skip
        ax.set(xlabel="atoms N", ylabel="Var[v^T A v], A = dH^T dH ((eV/A^2)^4)")
        ax.legend(fontsize="small")
        ax.set_title(f"one-probe estimator variance, {key} models' test error matrices", fontsize="medium")
        paths.append(save(fig, "variance-vs-n.png"))
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for name, t in agg.get("gap_trends", {}).items():
            fit = t["hessian_rmse"]
            pts = [(e["mean_atoms"], e["hessian_rmse"]) for e in t["by_bin"].values()]
            p = "–" if fit["p_value"] is None else f"{fit['p_value']:.2g}"
            axes[0].plot(*zip(*pts, strict=True), "o-", label=f"{name}: N^{fit['exponent']:+.2f} (p={p})")
        axes[0].axhline(1.0, color="k", lw=0.8, ls=":")
        axes[0].set(xscale="log", yscale="log", xlabel="atoms (bin mean)",
                    ylabel="test Hessian RMSE ratio b / a (geometric mean over seeds)")  # fmt: skip
        axes[0].set_title("the accuracy gap: < 1 = b better than a", fontsize="medium")
        axes[0].legend(fontsize="x-small")
        multi = {k: v for k, v in geoms.items() if sum(k in b["cells"] for b in bins.values()) >= 2} or geoms
        for key, rows in sorted(multi.items()):  # the schemes evaluated in >= 2 bins (else all)
            fit = agg["exponents"][key]["onehot_over_gaussian"]
            ratio = [g["formula"]["onehot"] / g["formula"]["gaussian"] for g in rows]
            axes[1].loglog([g["n_atoms"] for g in rows], ratio, "o", ms=3, alpha=0.5,
                           label=f"{key}: N^{fit['exponent']:.2f}")  # fmt: skip
        rows = [g for v in multi.values() for g in v]
        n0 = min(g["n_atoms"] for g in rows)
        r0 = np.median([g["formula"]["onehot"] / g["formula"]["gaussian"] for g in rows if g["n_atoms"] == n0])
        n_all = np.array(sorted({g["n_atoms"] for g in rows}), float)
        axes[1].loglog(n_all, r0 * n_all / n0, "k--", lw=0.8, label="N^1 (local errors, theory)")
        axes[1].set(xlabel="atoms N", ylabel="Var one-hot / Var Gaussian (closed form)")
        axes[1].set_title("estimator variance ratio on each test error matrix", fontsize="medium")
        axes[1].legend(fontsize="x-small")
        paths.append(save(fig, "gap-vs-n.png"))
    if label_cost:
        with open(label_cost) as f:
            rows = json.load(f)["rows"]
        n = [r["n_atoms"] for r in rows]
        fig, ax = plt.subplots(figsize=(6, 4.5))
        ax.loglog(n, [r["hessian_s"] for r in rows], "o-", label="FD Hessian (1 + 6N gradients)")
        ax.loglog(n, [r["hvp_s"] for r in rows], "s-", label=f"K = {rows[0]['num_probes']} FD HVPs (1 + 2K gradients)")
        ax.loglog(n, [r["gradient_s"] for r in rows], "^-", label="one gradient (E, F)")
        ax.set(xlabel="atoms N", ylabel="seconds per geometry (GFN2-xTB, 1 thread)")
        ax.legend(fontsize="small")
        paths.append(save(fig, "label-cost-vs-n.png"))
    if memory:
        with open(memory) as f:
            recs = [r for r in json.load(f) if "error" not in r]
        fig, ax = plt.subplots(figsize=(6, 4.5))
        series = {"E-F": lambda r: r["peak_bytes"] if r["scheme"] == "E-F" else None,
                  "E-F-HVP K=1": lambda r: r["peak_bytes"] if r["scheme"].startswith("E-F-HVP") else None}  # fmt: skip
        for name, get in series.items():
            pts = sorted((r["n_atoms"], get(r)) for r in recs if get(r))
            if pts:
                ax.loglog(*zip(*pts, strict=True), "o-", label=name)
        for chunk in ("all", "24"):
            pts = sorted(
                (r["n_atoms"], t["peak_bytes"])
                for r in recs if r["scheme"] == "E-F-H"
                for c, t in r.get("chunk_trials", {}).items()
                if "peak_bytes" in t and (c == "24") == (chunk == "24")
            )  # fmt: skip
            if pts:
                ax.loglog(*zip(*pts, strict=True), "s--", label=f"E-F-H ({chunk} columns per pass)")
        ax.axhline(24 * 2**30, color="k", lw=0.8, ls=":", label="24 GiB (this machine)")
        ax.set(xlabel="atoms N (scaling-set molecules)", ylabel="XLA peak bytes of one training step")
        ax.legend(fontsize="small")
        paths.append(save(fig, "memory-vs-n.png"))
    return paths


def check_bins(requested: Sequence[str] | None, bins_json: str) -> list[str]:
    """The bins to run: those requested, or every complete bin; a requested bin that is not complete
    (generation still running: a cell trained on it now would be a different experiment) is an error."""
    with open(bins_json) as f:
        bins = json.load(f)["bins"]
    complete = [b for b, info in bins.items() if info.get("complete")]
    if not requested:
        return sorted(complete, key=scaling.bin_low)
    bad = [b for b in requested if b not in complete]
    if bad:
        raise SystemExit(f"{bins_json}: bins {bad} are not complete (complete: {complete}); "
                         "finish experiments/make_scale_data.py and --assemble first")  # fmt: skip
    return list(requested)


def main(argv: Sequence[str]) -> None:
    args, rest = scaling_parser().parse_known_args(argv)
    if args.help:
        scaling_parser().print_help()
        print("\nrun.py options (the base config of every cell):")
        config_parser().print_help()
        return
    if args.aggregate or args.plots:
        agg = scaling.aggregate(args.root)
        print(scaling_report.render_tables(agg))
        if args.results_md:
            with open(args.results_md) as f:
                text = f.read()
            write_atomic(args.results_md, scaling_report.splice_results_md(text, scaling_report.render_results_md(agg)))
            print(f"rewrote the generated block of {args.results_md}")
        for path in plot(agg, args.root, args.plots, args.label_cost, args.memory) if args.plots else []:
            print(f"wrote {path}")
        return
    base: Config = parse_args(rest)
    if args.amend:
        print(json.dumps(scaling.amend_settings(args.root, base, why=args.amend), indent=1))
        return
    paths = scaling.data_paths(args.data_dir, args.prefix)
    missing = [p for p in paths.values() if not os.path.exists(p)]
    if missing:
        raise SystemExit(f"missing data files {missing}: run experiments/make_scale_data.py (--assemble)")
    if args.reevaluate:
        print(f"{len(scaling.reevaluate(args.root, paths))} cells re-evaluated")
        return
    bins = check_bins(args.bins, os.path.join(args.data_dir, f"{args.prefix}-bins.json"))
    grid = scaling.ScaleGrid(
        tuple(bins), tuple(args.schemes), tuple(args.regimes), args.seeds, tuple(args.hessian_bins), args.num_probes
    )
    if args.status:
        cells = grid.cells()
        done = [c for c in cells if os.path.exists(os.path.join(c.workdir(args.root), scaling.EVAL))]
        for c in cells:
            print(f"{c.bin:>8} {c.name:<24} {'done' if c in done else 'left'}")
        print(f"{len(done)}/{len(cells)} done")
        return
    outcome = scaling.run_scaling(args.root, base, grid, paths, keep_going=args.keep_going)
    print({k: len(v) for k, v in outcome.items()})


if __name__ == "__main__":
    main(sys.argv[1:])
