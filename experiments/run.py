"""Train an equivariant potential with one of the four PHL schemes and print test-set errors.

    python experiments/run.py --probe=random                 # E-F-HVP, Gaussian probes
    python experiments/run.py --probe=none|onehot|full       # E-F, E-F-HVP one-hot, E-F-H
    python experiments/run.py --help                         # every option

With no --data it trains on the bundled reaction set (RTP, IRC and NMS files) and reports test
errors per category. Results: <workdir>/results.json.
"""

import sys

from phljax.config import config_parser, parse_args
from phljax.train import train

if __name__ == "__main__":
    if "-h" in sys.argv or "--help" in sys.argv:
        config_parser(__doc__).print_help()
        sys.exit(0)
    config = parse_args(sys.argv[1:])
    if "--workdir" not in " ".join(sys.argv):
        config = config.replace(workdir=f"runs/{config.probe}")
    train(config)
