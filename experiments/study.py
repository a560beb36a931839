"""The PHL study: every scheme x probe regime x seed on named splits, resumable, with paired statistics.

Do E-F-HVP schemes match full-Hessian E-F-H training, and do random probes beat one-hot ones?
Cells run priority-first (randomized probes before fixed, protocols in the order given, seed 0 of
every scheme before seed 1, ...); a finished cell is never redone, an interrupted one resumes from
its checkpoints. Any `run.py` option sets the base config of every cell (`--epochs`, `--channels`,
`--batch-size`, `--data`, ...); the study sets the scheme, probes, seeds and split of each.

    mkdir -p results/study
    nohup nice -n 10 python experiments/study.py --root results/study --protocol random extrapolate \\
        --seeds 5 --epochs 1000 --no-progress > results/study/log.txt 2>&1 &
    python experiments/study.py --root results/study --status               # done / running / left, ETA
    touch results/study/STOP                                                # stop after the run in flight
    rm results/study/STOP && python experiments/study.py --root results/study --protocol random extrapolate \\
        --seeds 5 --epochs 1000 --no-progress                               # continue (same settings)
    python experiments/study.py --root results/study --aggregate --plots results/study/plots
    python experiments/study.py --root results/study --stationary   # item 5 at all 36 RTP geometries
    python experiments/study.py --root results/study --reevaluate --protocol reactions  # newer metrics
    python experiments/study.py --root results/quick --protocol random --schemes none random \\
        --regimes randomized --seeds 3 --epochs 20 --data phljax/data/bundled/chon_nms_small.h5

Protocols: `random` (80/10/10 over every geometry), `extrapolate` (train/validate on RTP+IRC, test
on all NMS), `reactions` (leave-reactions-out, 4 folds, seed s tests fold s % 4). Schemes: `none`
(E-F), `onehot`, `random` (E-F-HVP, Gaussian probes), `full` (E-F-H). Results:
<root>/<protocol>/<scheme>[-<regime>]-s<seed>/results.json, <root>/aggregate.json (`phljax.study`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import numpy as np

from phljax.config import Config, config_parser, parse_args
from phljax.study import (
    PROTOCOLS,
    QUANTITIES,
    REGIMES,
    SCHEME_SLUGS,
    SUBSETS,
    UNITS,
    Study,
    aggregate,
    format_status,
    learning_curves,
    reevaluate,
    render_tables,
    run_study,
    status,
    table_quantities,
)
from phljax.study.stationary import DEFAULT_DATA, STATIONARY_JSON, render_stationary, stationary_study


def study_parser() -> argparse.ArgumentParser:
    """The study's own flags; every other flag goes to `phljax.config.parse_args`."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False, add_help=False
    )
    p.add_argument("-h", "--help", action="store_true", help="this help and run.py's options")
    p.add_argument("--root", default="results/study", help="study root directory (default: results/study)")
    p.add_argument("--protocol", nargs="+", default=["random", "extrapolate"], choices=list(PROTOCOLS))
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default: 5)")
    p.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=REGIMES, help="HVP probe regimes")
    p.add_argument(
        "--schemes",
        nargs="+",
        default=list(SCHEME_SLUGS),
        choices=list(SCHEME_SLUGS),
        help="--probe values: none (E-F), onehot, random (E-F-HVP), full (E-F-H)",
    )
    p.add_argument("--n-folds", type=int, default=4, help="folds of the reactions protocol (default: 4)")
    p.add_argument("--keep-going", action="store_true", help="record a failing cell and go on")
    p.add_argument("--status", action="store_true", help="print the state of every cell and an ETA, then exit")
    p.add_argument("--aggregate", action="store_true", help="write <root>/aggregate.json, print the tables, exit")
    p.add_argument("--plots", metavar="DIR", help="with --aggregate: learning curves and bar charts (PNG) into DIR")
    p.add_argument("--min-seeds", type=int, default=3, help="tables report entries over >= this many seeds")
    p.add_argument(
        "--stationary",
        nargs="*",
        metavar="FILE.h5",
        help="evaluate every finished cell at every stationary point of FILE.h5 (default: the bundled RTP "
        "file): frequencies, eigenvalues, TS index; writes <root>/stationary.json, prints the tables, exits",
    )
    p.add_argument(
        "--reevaluate",
        action="store_true",
        help="add the metrics of the current evaluation (per-formula relative energies, unidentified "
        "formulas) to finished cells of --protocol whose results.json lacks them, keep the rest, exit",
    )
    return p


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, Config]:
    """Command line -> (study flags, base config of every cell)."""
    args, rest = study_parser().parse_known_args(argv)
    return args, parse_args(rest) if not args.help else Config()


def plot(root: str, out_dir: str, agg: dict) -> list[str]:
    """PNGs into `out_dir`, per protocol: validation E/F/H RMSE (where logged) and loss against epoch
    and wall time, seed means (curves-<protocol>.png), and test RMSE per category, mean with
    sample-std error bars over seeds (bars-<protocol>.png; energy_rel_rmse, each formula's mean error
    removed, beside energy_rmse where the cells have it). Returns the paths."""
    import matplotlib  # noqa: PLC0415 (optional: the dev extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for protocol, curves in learning_curves(root).items():
        names = [q for q in QUANTITIES if all(q in c for c in curves.values())] + ["val_loss"]
        fig, axes = plt.subplots(len(names), 2, figsize=(10, 3 * len(names)), squeeze=False)
        for row, name in zip(axes, names, strict=True):
            unit = UNITS.get(name.split("_")[0], "weighted sum of squares")
            for key, c in curves.items():
                if name in c:
                    ok = np.isfinite(c[name])  # validation errors are logged every few epochs
                    row[0].plot(c["epoch"][ok], c[name][ok], ".-", label=key)
                    row[1].plot(c["wall_time_s"][ok], c[name][ok], ".-", label=key)
            for ax, x in zip(row, ("epoch", "wall time (s)"), strict=True):
                ax.set(xlabel=x, ylabel=f"validation {name.removeprefix('val_')} ({unit})", yscale="log")
        axes[0, 0].legend(fontsize="small")
        fig.suptitle(f"{protocol}: validation error, mean over seeds")
        fig.tight_layout()
        paths.append(os.path.join(out_dir, f"curves-{protocol}.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    for protocol, entry in agg["protocols"].items():
        cells = entry["cells"]
        subsets = [s for s in SUBSETS if any(s in c["subsets"] for c in cells.values())]
        quantities = table_quantities(cells)
        fig, axes = plt.subplots(1, len(quantities), figsize=(5 * len(quantities), 3.5), squeeze=False)
        width = 0.8 / max(len(cells), 1)
        for ax, q in zip(axes[0], quantities, strict=True):
            for i, (key, cell) in enumerate(cells.items()):
                st = [cell["subsets"].get(s, {}).get(q) for s in subsets]
                mean = [np.nan if x is None else x["mean"] for x in st]
                err = [0.0 if x is None or x["std"] is None else x["std"] for x in st]
                ax.bar(np.arange(len(subsets)) + i * width, mean, width, yerr=err, capsize=2, label=key)
            ax.set_xticks(np.arange(len(subsets)) + 0.4 - width / 2, subsets)
            ax.set(ylabel=f"test {q} ({UNITS[q.split('_')[0]]})")
        axes[0, 0].legend(fontsize="small")
        fig.suptitle(f"{protocol}: test RMSE, mean ± std over seeds")
        fig.tight_layout()
        paths.append(os.path.join(out_dir, f"bars-{protocol}.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def main(argv: Sequence[str]) -> None:
    args, base = parse(argv)
    if args.help:
        study_parser().print_help()
        print("\nrun.py options (the base config of every cell):")
        config_parser().print_help()
        return
    if args.status:
        print(format_status(status(args.root)))
        return
    if args.reevaluate:
        updated = reevaluate(args.root, args.protocol)
        print(f"{len(updated)} cells re-evaluated")
        return
    if args.stationary is not None:
        found = stationary_study(args.root, args.stationary or DEFAULT_DATA, args.protocol)
        print(render_stationary(found, args.min_seeds))
        print(f"wrote {os.path.join(args.root, STATIONARY_JSON)}")
        return
    if args.aggregate or args.plots:
        agg = aggregate(args.root)
        print(render_tables(agg, args.min_seeds))
        print(f"\nwrote {os.path.join(args.root, 'aggregate.json')}")
        for path in plot(args.root, args.plots, agg) if args.plots else []:
            print(f"wrote {path}")
        return
    study = Study(tuple(args.protocol), tuple(args.schemes), tuple(args.regimes), args.seeds, args.n_folds)
    outcome = run_study(args.root, base, study, keep_going=args.keep_going)
    print({k: len(v) for k, v in outcome.items()})
    print(format_status(status(args.root)))


if __name__ == "__main__":
    main(sys.argv[1:])
