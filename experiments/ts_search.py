"""TS search benchmark: Sella on trained models from the pipeline's TS guesses and perturbed DFT TSs.

    python experiments/ts_search.py --workdir results/study/extrapolate/ef-s0 [--workdir ...]
    python experiments/ts_search.py --study-root results/study --protocol random --seed 0
    python experiments/ts_search.py --workdir runs/random --reactions hcn_hnc --max-steps 50 --out runs/ts

Each model (one --workdir each, labelled by its scheme; or every finished scheme of a study's
protocol and seed) runs Sella (order=1) on every bundled reaction from the pipeline's TS guess and
from --perturbations perturbed DFT TSs, once with the model's Hessian at every step and once with
Sella's own, then the IRC both ways and relaxed ends (see phljax/ts_search/). One JSON line per
finished attempt goes to <out>/attempts.jsonl: run the same command again to resume. Tables:
<out>/ts_search.md; everything: <out>/ts_search.json. --seed seeds the perturbations and, with
--study-root, picks the study seed; the default --out is results/ts_search, or
results/ts_search/<protocol>-s<seed> with --study-root.
"""

import argparse
import logging
import os
import sys

from phljax import ts_search


def parse_args(argv=None):
    defaults = ts_search.Settings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", action="append", default=[], help="a trained run's work directory (repeatable)")
    parser.add_argument("--study-root", default=None, help="a study root (with --protocol): its finished runs")
    parser.add_argument("--protocol", default=None, help="the study protocol, e.g. random or extrapolate")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="perturbation seed (and study seed)")
    parser.add_argument("--reactions", nargs="+", default=None, help="reaction ids (default: all with a TS)")
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps, help="Sella steps per search")
    parser.add_argument("--fmax", type=float, default=defaults.fmax, help="search convergence, eV/A")
    parser.add_argument("--perturbations", type=int, default=defaults.perturbations, help="perturbed starts")
    parser.add_argument("--rms-range", type=float, nargs=2, default=defaults.rms_range, metavar=("LOW", "HIGH"),
                        help="RMS of the perturbations, Angstrom (evenly spaced)")  # fmt: skip
    parser.add_argument("--guess", choices=("pipeline", "climbing"), default=defaults.guess,
                        help="pipeline: the start of the pipeline's DFT search (neb.npz guess or the file's TS frame); "
                        "climbing: the NEB's climbing image")  # fmt: skip
    parser.add_argument("--modes", nargs="+", choices=ts_search.MODES, default=list(defaults.modes))
    parser.add_argument("--rmsd-tol", type=float, default=defaults.rmsd_tol, help="RMSD to the DFT TS, Angstrom")
    parser.add_argument("--irc-steps", type=int, default=defaults.irc_steps, help="IRC steps per branch")
    parser.add_argument("--max-wall", type=float, default=defaults.max_wall_s, help="seconds per attempt")
    parser.add_argument("--out", default=None, help="output directory (see above)")
    args = parser.parse_args(argv)
    if bool(args.study_root) != bool(args.protocol):
        parser.error("--study-root and --protocol go together")
    if not args.workdir and not args.study_root:
        parser.error("give --workdir (one or more) or --study-root with --protocol")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    settings = ts_search.Settings(
        max_steps=args.max_steps,
        fmax=args.fmax,
        perturbations=args.perturbations,
        rms_range=tuple(args.rms_range),
        seed=args.seed,
        guess=args.guess,
        modes=tuple(args.modes),
        rmsd_tol=args.rmsd_tol,
        irc_steps=args.irc_steps,
        max_wall_s=args.max_wall,
    )
    models = [ts_search.model_from_workdir(w) for w in args.workdir]
    title = "TS search"
    if args.study_root:
        found = ts_search.study_models(args.study_root, args.protocol, args.seed)
        if not found:
            sys.exit(f"no finished run of protocol {args.protocol!r}, seed {args.seed} under {args.study_root}")
        models += found
        title = f"TS search: {args.protocol} protocol, seed {args.seed}"
    out = args.out or os.path.join("results", "ts_search", f"{args.protocol}-s{args.seed}" if args.study_root else "")
    references = ts_search.load_references(reactions=args.reactions)
    summary = ts_search.run_benchmark(models, settings, out, references=references, title=title)
    with open(os.path.join(out, ts_search.TABLES)) as f:
        print(f.read())
    print(f"wrote {out}/{ts_search.TABLES}, {ts_search.SUMMARY}, {ts_search.ATTEMPTS}")
    return summary


if __name__ == "__main__":
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("phljax.ts_search")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # orbax/absl give the root logger a handler: one line per attempt, not two
    main()
