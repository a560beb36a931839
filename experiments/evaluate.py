"""Evaluate a trained run's best checkpoint on HDF5 files of the ANI layout and write the errors as JSON.

python experiments/evaluate.py --workdir runs/random --data FILE.h5 [FILE2.h5 ...] [--out errors.json]
"""

import argparse
import json
import os

from phljax.evaluation import evaluate_workdir, format_table

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="work directory of a training run")
    parser.add_argument("--data", nargs="+", required=True, help="HDF5 files to evaluate on")
    parser.add_argument("--energy-unit", default=None, help="file energy unit (default: file attribute, else hartree)")
    parser.add_argument("--length-unit", default=None, help="file length unit (default: file attribute, else angstrom)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=None, help="JSON output (default: <workdir>/evaluation.json)")
    args = parser.parse_args()
    results = evaluate_workdir(
        args.workdir, args.data, energy_unit=args.energy_unit, length_unit=args.length_unit, batch_size=args.batch_size
    )
    out = args.out or os.path.join(args.workdir, "evaluation.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(format_table(results))
    print(f"wrote {out}")
