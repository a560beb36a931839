"""Train the four PHL schemes with the same settings and tabulate their test errors and epoch times.

    python experiments/compare_schemes.py --epochs 300 --workdir runs/compare [any run.py option]

Writes <workdir>/comparison.json and prints a Markdown table (errors in kcal/mol-based units,
change relative to E-F).
"""

import json
import os
import sys

from phljax.config import parse_args
from phljax.losses import SCHEMES
from phljax.train import prepare, train

if __name__ == "__main__":
    base = parse_args(sys.argv[1:])
    root = base.workdir if "--workdir" in sys.argv else "runs/compare"
    rows = {}
    for probe in SCHEMES:
        config = base.replace(probe=probe, workdir=os.path.join(root, probe))
        rows[probe] = train(config, prepare(config))
    with open(os.path.join(root, "comparison.json"), "w") as f:
        json.dump(rows, f, indent=2)
    ref = rows["none"]["errors_kcal_mol"]["test"]
    print("\n| scheme | E RMSE (kcal/mol) | F RMSE (kcal/mol/A) | H RMSE (kcal/mol/A^2) | epoch time (s) |")
    print("|---|---|---|---|---|")
    for r in rows.values():
        e = r["errors_kcal_mol"]["test"]
        cells = [
            f"{e[f'{q}_rmse']:.3f} ({100 * (e[f'{q}_rmse'] / ref[f'{q}_rmse'] - 1):+.0f}%)"
            for q in ("energy", "forces", "hessian")
        ]
        print(f"| {r['scheme']} | " + " | ".join(cells) + f" | {r['mean_epoch_time_s']:.2f} |")
