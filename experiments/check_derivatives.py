"""How consistent are the DFT labels' derivatives? Finite differences against PySCF's analytic ones.

    # FD HVPs of analytic gradients against the analytic Hessian, per step and integration grid:
    python experiments/check_derivatives.py --steps 1e-3 2e-3 5e-3 1e-2 2e-2 --grid-levels 5 7 \\
        --out data/dft_cache/fd_step_scan.json
    # analytic gradients (with and without grid response) against FD of the energy, per functional:
    python experiments/check_derivatives.py --gradients --xc b3lyp camb3lyp hyb_gga_xc_wb97x_d

The HVP route of `make_dataset.py --labels hvp` takes central differences of analytic gradients
(`phljax.datagen.dft.fd_hvp`). Central differences converge as O(h^2) down to a floor: SCF noise
at small h, and at every h any inconsistency between the analytic gradient and the analytic
Hessian they are compared with. The scan finds the flat part of the curve (where the data set's
step must lie) and, with a finer grid, whether the floor is the integration grid's. The gradient
check shows how far PySCF's default gradients (no grid response) are from the derivative of the
energy. Geometry: ase's g2 molecule, distorted with a fixed seed (as in `label_cost.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys

import numpy as np

from phljax.datagen.dft import LevelOfTheory, build_mol, fd_hvp, fd_hvp_error, label_geometry, run_scf
from phljax.datagen.labels import make_probes
from phljax.datagen.sampling import distorted_g2
from phljax.units import DFT_BOHR


def step_scan(name: str, level: LevelOfTheory, num_probes: int, steps: list[float], seed: int) -> dict:
    """max|H v - FD| / max|H v| for each step h (Angstrom), against one analytic Hessian."""
    rng = np.random.default_rng(seed)
    numbers, pos = distorted_g2(name, rng)
    ref = label_geometry(numbers, pos, level)
    probes = make_probes("gaussian", num_probes, len(numbers), rng)
    errors = []
    for h in steps:
        fd = fd_hvp(numbers, pos, probes, level, h)["hvps"]
        errors.append(fd_hvp_error(ref["hessian"], probes, fd))
        print(f"{name} grid {level.grid_level} h = {h:.0e} A: FD HVP error {errors[-1]:.2e}", flush=True)
    return {"name": name, "n_atoms": len(numbers), "grid_level": level.grid_level, "num_probes": num_probes,
            "steps_A": list(steps), "fd_rel_error": errors}  # fmt: skip


def gradient_check(name: str, level: LevelOfTheory, seed: int, step: float = 2e-3) -> dict:
    """Analytic DFT gradient (PySCF default, and with grid response) against central differences
    of the energy along every Cartesian coordinate (step Angstrom); max abs errors, Hartree/Bohr."""
    numbers, pos = distorted_g2(name, np.random.default_rng(seed))
    mf = run_scf(build_mol(numbers, pos, level), level)
    dm = mf.make_rdm1()
    g_default = np.asarray(mf.nuc_grad_method().kernel())
    grad = mf.nuc_grad_method()
    grad.grid_response = True
    g_response = np.asarray(grad.kernel())
    fd = np.zeros_like(g_default)
    for i, a in np.ndindex(*pos.shape):
        e = []
        for sign in (1, -1):
            p = pos.copy()
            p[i, a] += sign * step
            e.append(run_scf(build_mol(numbers, p, level), level, dm0=dm).e_tot)
        fd[i, a] = (e[0] - e[1]) / (2 * step / DFT_BOHR)
    out = {
        "name": name,
        "xc": level.xc,
        "grid_level": level.grid_level,
        "max_abs_gradient": float(np.abs(fd).max()),
        "error_default": float(np.abs(g_default - fd).max()),
        "error_grid_response": float(np.abs(g_response - fd).max()),
        "sum_of_gradients_default": float(np.abs(g_default.sum(0)).max()),
    }
    print(f"{name} {level.xc}: |g - FD| default {out['error_default']:.1e}, with grid response "
          f"{out['error_grid_response']:.1e} Eh/a0 (max |g| {out['max_abs_gradient']:.1e})", flush=True)  # fmt: skip
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--molecules", nargs="+", default=["H2O"], help="ase g2 names")
    p.add_argument("--steps", type=float, nargs="+", default=[1e-3, 2e-3, 5e-3, 1e-2, 2e-2], help="Angstrom")
    p.add_argument("--grid-levels", type=int, nargs="+", default=[5])
    p.add_argument("--num-probes", type=int, default=2)
    p.add_argument("--gradients", action="store_true", help="check gradients against FD energies instead")
    p.add_argument("--xc", nargs="+", default=[LevelOfTheory().xc], help="functionals of --gradients")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="check_derivatives.json")
    args = p.parse_args(argv)
    result = {
        "command": "python experiments/check_derivatives.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}",
        "level": LevelOfTheory().describe(),
    }
    rows = result["gradients" if args.gradients else "scans"] = []
    for grid in args.grid_levels:
        for name in args.molecules:
            if args.gradients:  # the DFT part alone: dispersion is analytic and exact
                for xc in args.xc:
                    lvl = dataclasses.replace(LevelOfTheory(), xc=xc, grid_level=grid, dispersion=False, conv_tol=1e-12)
                    rows.append(gradient_check(name, lvl, args.seed))
            else:
                lvl = dataclasses.replace(LevelOfTheory(), grid_level=grid)
                rows.append(step_scan(name, lvl, args.num_probes, args.steps, args.seed))
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
