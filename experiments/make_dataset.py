"""Generate (or resume) a reaction data set: RTP, IRC and NMS geometries with DFT labels.

    # the bundled set (12 reactions in data/reactions/; hours on 2 cores, resumable), one
    # single-thread worker per core (1.4x the labels per hour of one 2-thread process):
    OMP_NUM_THREADS=2 nice -n 10 python experiments/make_dataset.py --workers 2
    # one reaction, into its own cache and files:
    python experiments/make_dataset.py --reactions data/reactions/hcn_hnc.xyz --out runs/hcn --cache runs/hcn/cache
    # Hessian-free labels: 4 Gaussian probes and finite-difference HVPs per geometry
    python experiments/make_dataset.py --labels hvp --num-probes 4 --out runs/hvp --cache runs/hvp/cache
    # share one job out: a second machine labels rounds 11-20 (experiments/label_rounds.sh packs
    # the cache files it makes, to be merged back)
    python experiments/make_dataset.py --workers 16 --rounds 11-20
    # stop a running job after the task in flight (nothing lost): touch <cache>/STOP
    # write the HDF5 files and data card from what the cache holds now (partial is fine):
    python experiments/make_dataset.py --assemble

A reaction is a multi-frame xyz file: reactant, product (same atoms, same order), optionally a
TS guess. Every finished calculation is cached under --cache at once; rerunning skips it. The
output is three ANI-layout HDF5 files, <prefix>-RTP.h5, -IRC.h5, -NMS.h5, readable by
phljax.data.read_h5, plus DATA_CARD.md and summary.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

from phljax.datagen import reactions
from phljax.datagen.card import render_reaction_card
from phljax.datagen.dft import LevelOfTheory
from phljax.datagen.labels import PROBE_KINDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, "data", "dft_cache")
DEFAULT = reactions.ReactionConfig()  # every default below is the configuration's


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; with no flags it asks for the default :class:`ReactionConfig` (see :func:`config`)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reactions", nargs="+", default=sorted(glob.glob(os.path.join(ROOT, "data/reactions/*.xyz"))),
                   help="reaction xyz files, or .txt files listing them")  # fmt: skip
    p.add_argument("--only", default="", help="comma-separated reaction ids to run (default: all)")
    p.add_argument("--cache", default=os.path.join(CACHE, "reactions"))
    p.add_argument("--out", default=os.path.join(ROOT, "phljax/data/bundled"), help="directory of the HDF5 files")
    p.add_argument("--prefix", default="chon_reactions", help="file names <prefix>-RTP.h5, -IRC.h5, -NMS.h5")
    p.add_argument("--labels", choices=reactions.LABELS, default=DEFAULT.labels)
    p.add_argument("--num-probes", type=int, default=DEFAULT.num_probes, help="K probes per geometry with --labels hvp")
    p.add_argument("--probe-kind", choices=PROBE_KINDS, default=DEFAULT.probe_kind)
    p.add_argument("--fd-step", type=float, default=DEFAULT.fd_step, help="finite-difference step, Angstrom")
    p.add_argument("--n-irc", type=int, default=DEFAULT.n_irc, help="IRC points kept per direction")
    p.add_argument("--n-nms", type=int, default=DEFAULT.n_nms, help="normal-mode samples per stationary point")
    p.add_argument("--temperature", type=float, default=DEFAULT.temperature, help="NMS temperature, Kelvin")
    p.add_argument("--seed", type=int, default=DEFAULT.seed)
    p.add_argument("--xc", default=DEFAULT.level.xc, help="libxc functional (default: omegaB97X-D's XC part)")
    p.add_argument("--basis", default=DEFAULT.level.basis)
    p.add_argument("--grid-level", type=int, default=DEFAULT.level.grid_level)
    p.add_argument("--no-dispersion", action="store_true", help="leave out the CHG damped D2 term")
    p.add_argument("--max-asym-rel", type=float, default=DEFAULT.max_asym_rel,
                   help="Hessian symmetry check, max|H - H^T| / max|H|; a cache may loosen it (its rejections "
                        "that pass are labelled again), not tighten it")  # fmt: skip
    p.add_argument("--max-sum-rule-rel", type=float, default=DEFAULT.max_sum_rule_rel,
                   help="translational sum-rule check of each Hessian, max|sum_j H_ij|/max|H|")  # fmt: skip
    p.add_argument("--assemble", action="store_true", help="only write the HDF5 files from the cache")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--workers", type=int, default=1,
                   help="processes labelling at once, OMP_NUM_THREADS // workers threads each; PySCF's OpenMP "
                        "scales poorly on molecules this small, so use one worker per core")  # fmt: skip
    p.add_argument("--rounds", type=_rounds, default=None, metavar="FIRST-LAST",
                   help="label only these rounds (1-based, inclusive); a round is one IRC point per branch and "
                        "one NMS sample per stationary point of every reaction")  # fmt: skip
    p.add_argument("--label-cost", default=None,
                   help="measured labelling costs for the data card (from experiments/label_cost.py; default: "
                        "the bundled set's, data/dft_cache/label_cost.json, with the default --cache)")  # fmt: skip
    p.add_argument("--checks", nargs=2, metavar=("SCAN", "GRADIENTS"), default=None,
                   help="outputs of experiments/check_derivatives.py for the data card (default: the "
                        "bundled set's, in data/dft_cache/, with the default --cache)")  # fmt: skip
    args = p.parse_args(argv)
    bundled = os.path.abspath(args.cache) == os.path.abspath(os.path.join(CACHE, "reactions"))
    if args.label_cost is None:  # measurements of the bundled set belong on its card only
        args.label_cost = os.path.join(CACHE, "label_cost.json") if bundled else ""
    if args.checks is None:
        args.checks = [os.path.join(CACHE, f) if bundled else "" for f in ("fd_step_scan.json", "gradient_check.json")]
    return args


def config(args: argparse.Namespace) -> reactions.ReactionConfig:
    """The data set's configuration from the command line's settings."""
    level = LevelOfTheory(xc=args.xc, basis=args.basis, grid_level=args.grid_level,
                          dispersion=not args.no_dispersion)  # fmt: skip
    return reactions.ReactionConfig(
        level=level, labels=args.labels, num_probes=args.num_probes, probe_kind=args.probe_kind,
        fd_step=args.fd_step, n_irc=args.n_irc, n_nms=args.n_nms, temperature=args.temperature, seed=args.seed,
        max_asym_rel=args.max_asym_rel, max_sum_rule_rel=args.max_sum_rule_rel,
    )  # fmt: skip


def main(argv=None) -> dict:
    args = parse_args(argv)
    reactions.setup_logging(args.cache, to_file=not args.assemble)  # the cache's log.txt records labelling runs
    if not args.assemble:
        cfg = config(args)
        rxns = reactions.read_reactions(args.reactions)
        if args.only:
            wanted = set(args.only.split(","))
            unknown = wanted - {r.id for r in rxns}
            if unknown:
                raise SystemExit(f"--only: unknown reaction ids {sorted(unknown)}")
            rxns = [r for r in rxns if r.id in wanted]
        reactions.run(cfg, rxns, args.cache, progress=not args.no_progress, workers=args.workers,
                      rounds=args.rounds)  # fmt: skip
    summary = reactions.assemble(args.cache, args.out, args.prefix)
    with open(os.path.join(args.out, f"{args.prefix}.DATA_CARD.md"), "w") as f:
        cost = json.load(open(args.label_cost)) if os.path.exists(args.label_cost) else None
        named = zip(("scans", "gradients"), args.checks, strict=True)
        checks = {k: json.load(open(p)) for k, p in named if os.path.exists(p)}
        f.write(render_reaction_card(summary, args.prefix, cost, checks))
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1, default=str))
    return summary


def _rounds(text: str) -> tuple[int, int]:
    """``FIRST-LAST`` or ``N`` -> ``(first, last)``, 1-based and inclusive."""
    parts = text.split("-")
    if len(parts) <= 2 and all(p.isdigit() for p in parts):
        first, last = int(parts[0]), int(parts[-1])
        if 1 <= first <= last:
            return first, last
    raise argparse.ArgumentTypeError(f"expected FIRST-LAST with 1 <= FIRST <= LAST (e.g. 11-20), got {text!r}")


if __name__ == "__main__":
    main()
