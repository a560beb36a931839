"""Train the four PHL schemes with the same settings and tabulate their test errors and epoch times.

    python experiments/compare_schemes.py --epochs 300 --workdir runs/compare [any run.py option]

--workdir is the root (default runs/compare): scheme <probe> trains in <root>/<probe>. Writes
<root>/comparison.json and prints a Markdown table (errors in kcal/mol-based units, change
relative to E-F). One seed: for seeds and significance use experiments/study.py.
"""

import argparse
import json
import os

from phljax import distributed
from phljax.config import config_parser, parse_args
from phljax.losses import SCHEMES
from phljax.train import prepare, train

if __name__ == "__main__":
    parser = config_parser(__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(workdir="runs/compare")
    base = parse_args(parser=parser)
    distributed.initialize(base.coordinator_address, base.num_processes, base.process_id)
    root = base.workdir
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
