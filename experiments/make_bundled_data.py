"""Generate (or resume) the bundled omegaB97X-D/6-31G(d) NMS data set, and assemble it.

    OMP_NUM_THREADS=2 nice -n 10 python experiments/make_bundled_data.py          # run/resume + assemble
    python experiments/make_bundled_data.py --assemble                           # assemble only (partial ok)

Every finished calculation is cached in --cache (one npz per geometry); rerunning skips them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from phljax.datagen import pipeline  # noqa: E402
from phljax.datagen.card import render_data_card  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=os.path.join(ROOT, "data/dft_cache/nms_small"))
    p.add_argument("--out", default=os.path.join(ROOT, "phljax/data/bundled/chon_nms_small.h5"))
    p.add_argument("--molecules", default=",".join(pipeline.MOLECULES), help="comma-separated names")
    p.add_argument("--n-samples", type=int, default=30, help="NMS geometries per molecule (+ minimum)")
    p.add_argument("--temperature", type=float, default=500.0, help="Kelvin")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--assemble", action="store_true", help="only convert the cache to HDF5")
    p.add_argument("--no-assemble", action="store_true", help="do not write the HDF5 at the end")
    args = p.parse_args(argv)

    pipeline.setup_logging(args.cache)
    config_path = os.path.join(args.cache, "config.json")
    if not args.assemble:
        cfg = pipeline.NMSConfig(
            molecules=tuple(args.molecules.split(",")),
            n_samples=args.n_samples,
            temperature=args.temperature,
            seed=args.seed,
        )
        with open(config_path, "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
        pipeline.run(cfg, args.cache)
    if not args.no_assemble:
        summary = pipeline.assemble(args.cache, args.out)
        with open(config_path) as f:
            config = json.load(f)
        card = render_data_card(summary, config, os.path.basename(args.out))
        with open(os.path.join(os.path.dirname(os.path.abspath(args.out)), "DATA_CARD.md"), "w") as f:
            f.write(card)
        print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
