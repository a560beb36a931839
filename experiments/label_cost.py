"""Labelling cost per geometry: analytic Hessian vs finite-difference HVPs, against molecule size.

    OMP_NUM_THREADS=2 python experiments/label_cost.py --out data/dft_cache/label_cost.json
    python experiments/label_cost.py --molecules H2O CH3CHO --num-probes 4      # a quick subset

For each molecule (ase's g2 geometry, slightly distorted off its minimum with a fixed seed) at
the data set's level of theory, it times (1) the analytic route: SCF + gradient + analytic
Hessian, (2) the Hessian-free route: SCF + gradient + 2K displaced SCF + gradient pairs
(`phljax.datagen.dft.fd_hvp`, K Gaussian probes), and reports the finite-difference error
max|H v - FD| / max|H v| against the analytic Hessian. The JSON feeds the data card's table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from phljax.datagen.dft import LevelOfTheory, fd_hvp, fd_hvp_error, label_geometry
from phljax.datagen.labels import make_probes
from phljax.datagen.reactions import ReactionConfig
from phljax.datagen.sampling import distorted_g2

DEFAULT = ["H2O", "H2CO", "HCOOH", "CH3OH", "CH3CHO", "CH3CH2OH", "C6H6"]


def measure(name: str, level: LevelOfTheory, num_probes: int, step: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    numbers, pos = distorted_g2(name, rng)  # off the minimum
    t0 = time.perf_counter()
    ref = label_geometry(numbers, pos, level)
    t_hess = time.perf_counter() - t0
    probes = make_probes("gaussian", num_probes, len(numbers), rng)
    out = fd_hvp(numbers, pos, probes, level, step)
    return {
        "name": name,
        "n_atoms": len(numbers),
        "hessian_s": t_hess,
        "gradient_s": ref["wall_scf"] + ref["wall_grad"],
        "hvp_s": out["wall_scf"] + out["wall_fd"],
        "num_probes": num_probes,
        "fd_step_A": step,
        "fd_rel_error": fd_hvp_error(ref["hessian"], probes, out["hvps"]),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--molecules", nargs="+", default=DEFAULT, help="ase g2 names")
    p.add_argument("--num-probes", type=int, default=ReactionConfig.num_probes, help="K, as the data set's")
    p.add_argument("--fd-step", type=float, default=ReactionConfig.fd_step, help="Angstrom, as the data set's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="label_cost.json")
    args = p.parse_args(argv)
    level = LevelOfTheory()
    rows = []
    for name in args.molecules:
        rows.append(measure(name, level, args.num_probes, args.fd_step, args.seed))
        r = rows[-1]
        print(f"{name:10s} {r['n_atoms']:3d} atoms  Hessian {r['hessian_s']:7.1f} s  E+F {r['gradient_s']:6.1f} s  "
              f"HVP(K={r['num_probes']}) {r['hvp_s']:7.1f} s  ratio {r['hessian_s'] / r['hvp_s']:5.2f}  "
              f"FD error {r['fd_rel_error']:.1e}", flush=True)  # fmt: skip
        result = {
            "command": "python experiments/label_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": f"{platform.processor() or platform.machine()}, OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, shared with a background DFT job",
            "level": level.describe(),
            "rows": rows,
        }
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
