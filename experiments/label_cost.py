"""Labelling cost per geometry: a Hessian vs K finite-difference HVPs, against molecule size.

    OMP_NUM_THREADS=2 python experiments/label_cost.py --out data/dft_cache/label_cost.json
    python experiments/label_cost.py --molecules H2O CH3CHO --num-probes 4      # a quick subset
    OMP_NUM_THREADS=1 python experiments/label_cost.py --level xtb --out data/xtb_cache/label_cost.json

`--level xtb` (the scaling set's GFN2-xTB, `scale` extra): for one molecule of each size bin of
`phljax.datagen.scale` (RDKit conformer, no relaxation: cost does not depend on it), the wall time
of one analytic gradient (median of --repeats), of K FD HVPs (1 + 2K gradients) and of the FD
Hessian (1 + 6N gradients: measured up to --max-hessian-atoms atoms, beyond that 1 + 6N times the
seconds per gradient of the K FD HVPs, the same warm-started displacements; marked
`hessian_estimated`).

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

from phljax.datagen import scale, xtb
from phljax.datagen.dft import LevelOfTheory, fd_hvp, fd_hvp_error, label_geometry
from phljax.datagen.labels import make_probes
from phljax.datagen.reactions import ReactionConfig
from phljax.datagen.sampling import distorted_g2

DEFAULT = ["H2O", "H2CO", "HCOOH", "CH3OH", "CH3CHO", "CH3CH2OH", "C6H6"]
#: one molecule per size bin of the scaling set (alkanes: one family, so size is the only change), and its largest
XTB_DEFAULT = ["propane", "hexane", "decane", "hexadecane", "tetracosane", "triacontane", "pentacontane", "peg24"]


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


def measure_xtb(name: str, num_probes: int, repeats: int, max_hessian_atoms: int, seed: int) -> dict:
    """GFN2-xTB label cost of one scaling-set molecule (see the module docstring)."""
    mol = {m.name: m for m in scale.SCALE_MOLECULES}[name]
    numbers, pos = scale.conformer(mol.smiles, 0, name)
    rng = np.random.default_rng(seed)
    xtb.singlepoint(numbers, pos)  # warm up (library load, first allocation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        xtb.singlepoint(numbers, pos + 1e-3 * rng.standard_normal(pos.shape))
        times.append(time.perf_counter() - t0)
    t_grad = float(np.median(times))
    n = len(numbers)
    probes = make_probes("gaussian", num_probes, n, rng)
    t0 = time.perf_counter()
    out = xtb.fd_hvp(numbers, pos, probes)
    hvp_s = time.perf_counter() - t0
    row = {"name": name, "n_atoms": n, "gradient_s": t_grad, "gradient_s_all": times, "hvp_s": hvp_s,
           "hvp_gradients": int(out["n_gradients"]), "hessian_gradients": 1 + 6 * n,
           "num_probes": num_probes}  # fmt: skip
    if n <= max_hessian_atoms:
        t0 = time.perf_counter()
        xtb.fd_hessian(numbers, pos, check_columns=0)
        row |= {"hessian_s": time.perf_counter() - t0, "hessian_estimated": False}
    else:
        # the FD Hessian is the FD HVP's machinery with 6N displacements: its warm-started gradients
        row |= {"hessian_s": (1 + 6 * n) * hvp_s / row["hvp_gradients"], "hessian_estimated": True}
    return row


def _xtb_line(r: dict) -> str:
    return (f"{r['name']:14s} {r['n_atoms']:4d} atoms  gradient {r['gradient_s']:7.3f} s  HVP(K={r['num_probes']}) "
            f"{r['hvp_s']:7.2f} s  Hessian {r['hessian_s']:8.1f} s{' (est.)' if r['hessian_estimated'] else ''}  "
            f"ratio {r['hessian_s'] / r['hvp_s']:6.1f}")  # fmt: skip


def _dft_line(r: dict) -> str:
    return (f"{r['name']:10s} {r['n_atoms']:3d} atoms  Hessian {r['hessian_s']:7.1f} s  E+F {r['gradient_s']:6.1f} s  "
            f"HVP(K={r['num_probes']}) {r['hvp_s']:7.1f} s  ratio {r['hessian_s'] / r['hvp_s']:5.2f}  "
            f"FD error {r['fd_rel_error']:.1e}")  # fmt: skip


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--level", choices=["dft", "xtb"], default="dft", help="the reaction set's DFT or the scaling set's xTB"
    )
    p.add_argument("--molecules", nargs="+", help=f"ase g2 names (dft, default {DEFAULT}) or scaling-set names")
    p.add_argument("--repeats", type=int, default=5, help="xtb: gradient timings (median)")
    p.add_argument("--max-hessian-atoms", type=int, default=60, help="xtb: measure the FD Hessian up to this size")
    p.add_argument("--num-probes", type=int, default=ReactionConfig.num_probes, help="K, as the data set's")
    p.add_argument("--fd-step", type=float, default=ReactionConfig.fd_step, help="Angstrom, as the data set's (dft)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="label_cost.json")
    args = p.parse_args(argv)
    if args.level == "xtb":
        names, level, line = args.molecules or XTB_DEFAULT, xtb.XTBLevel(), _xtb_line

        def one(name):
            return measure_xtb(name, args.num_probes, args.repeats, args.max_hessian_atoms, args.seed)
    else:
        names, level, line = args.molecules or DEFAULT, LevelOfTheory(), _dft_line

        def one(name):
            return measure(name, level, args.num_probes, args.fd_step, args.seed)

    load = os.getloadavg()[0]
    rows = []
    for name in names:
        rows.append(one(name))
        print(line(rows[-1]), flush=True)
        result = {
            "command": "python experiments/label_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": f"{platform.processor() or platform.machine()}, OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, load average before {load:.2f}",
            "level": level.describe(),
            "rows": rows,
        }
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
