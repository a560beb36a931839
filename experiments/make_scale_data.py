"""Generate (or resume) the size-scaling data set: C/H/N/O molecules of 10-180 atoms, GFN2-xTB labels.

    pip install -e '.[scale]'
    # the whole set (phljax.datagen.scale.SCALE_MOLECULES; resumable: rerun to continue):
    OMP_NUM_THREADS=1 nice -n 10 python experiments/make_scale_data.py
    # a few molecules into their own cache and files:
    python experiments/make_scale_data.py --only propane,benzene --cache runs/scale/cache --out runs/scale
    # two processes on one cache: give them disjoint --only lists
    # stop after the calculation in flight (nothing lost): touch <cache>/STOP
    # write the HDF5 files and data card from what the cache holds now (partial is fine):
    python experiments/make_scale_data.py --assemble

Every finished calculation is cached under --cache at once; rerunning skips it. The output is
<prefix>-train.h5 (E, F; H for small molecules), <prefix>-train-<kind>.h5 (E, F and each training
sample's pool of <kind> probes with reference HVPs, for --probe-mode data), -test.h5 and
-minima.h5 (E, F, H) in --out, readable by phljax.data.read_h5, plus <prefix>.DATA_CARD.md;
summary.json goes to the cache.
"""

from __future__ import annotations

import argparse
import json
import os

from phljax.datagen import scale
from phljax.datagen.card import render_scale_card
from phljax.datagen.labels import PROBE_KINDS
from phljax.datagen.reactions import setup_logging
from phljax.datagen.xtb import XTBLevel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = scale.ScaleConfig()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated molecule names to run (default: all)")
    p.add_argument("--cache", default=os.path.join(ROOT, "data", "xtb_cache", "scale"))
    p.add_argument("--out", default=os.path.join(ROOT, "data", "scale"), help="directory of the HDF5 files")
    p.add_argument("--prefix", default="xtb_scale", help="file names <prefix>-train.h5, -test.h5, -minima.h5")
    p.add_argument("--n-nms", type=int, default=DEFAULT.n_nms, help="normal-mode samples per molecule")
    p.add_argument("--temperature", type=float, default=DEFAULT.temperature, help="NMS temperature, Kelvin")
    p.add_argument("--n-test-per-bin", type=int, default=DEFAULT.n_test_per_bin,
                   help="samples per size bin labelled with a full FD Hessian (the test subset)")  # fmt: skip
    p.add_argument("--train-hessian-max-atoms", type=int, default=DEFAULT.train_hessian_max_atoms,
                   help="training samples of molecules with <= this many atoms get FD Hessians (0: none)")  # fmt: skip
    p.add_argument("--pool-kinds", default=",".join(DEFAULT.pool_kinds),
                   help=f"comma-separated probe kinds of each training pool, of {','.join(PROBE_KINDS)}")  # fmt: skip
    p.add_argument("--pool-size", type=int, default=DEFAULT.pool_size, help="probes per kind in each pool")
    p.add_argument("--fd-step", type=float, default=DEFAULT.fd_step, help="finite-difference step, Angstrom")
    p.add_argument("--fmax", type=float, default=DEFAULT.fmax, help="LBFGS convergence of the minima, eV/Angstrom")
    p.add_argument("--accuracy", type=float, default=DEFAULT.level.accuracy, help="tblite accuracy")
    p.add_argument("--seed", type=int, default=DEFAULT.seed)
    p.add_argument("--assemble", action="store_true", help="only write the HDF5 files and card from the cache")
    return p.parse_args(argv)


def config(args: argparse.Namespace) -> scale.ScaleConfig:
    """The data set's configuration from the command line's settings."""
    return scale.ScaleConfig(
        level=XTBLevel(accuracy=args.accuracy), seed=args.seed, fmax=args.fmax, n_nms=args.n_nms,
        temperature=args.temperature, n_test_per_bin=args.n_test_per_bin,
        train_hessian_max_atoms=args.train_hessian_max_atoms,
        pool_kinds=tuple(k for k in args.pool_kinds.split(",") if k), pool_size=args.pool_size, fd_step=args.fd_step,
    )  # fmt: skip


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging(args.cache, to_file=not args.assemble)  # the cache's log.txt records labelling runs
    if not args.assemble:
        names = [n for n in args.only.split(",") if n] or None
        try:
            scale.run(config(args), args.cache, names)
        except ValueError as err:  # unknown names, a cache of another configuration
            raise SystemExit(str(err)) from None
    summary = scale.assemble(args.cache, args.out, args.prefix)
    with open(os.path.join(args.out, f"{args.prefix}.DATA_CARD.md"), "w") as f:
        f.write(render_scale_card(summary, args.prefix))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("config", "molecules")}, indent=1, default=str))
    return summary


if __name__ == "__main__":
    main()
