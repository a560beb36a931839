"""Train an equivariant potential with one of the four PHL schemes and print test-set errors.

    python experiments/run.py --probe=random                 # E-F-HVP, Gaussian probes
    python experiments/run.py --probe=none|onehot|full       # E-F, E-F-HVP one-hot, E-F-H
    python experiments/run.py --help                         # every option

With no --data it trains on the bundled reaction set (RTP, IRC and NMS files) and reports test
errors per category. Results: <workdir>/results.json (default workdir: runs/<probe>).
"""

import argparse

from phljax import distributed
from phljax.config import config_parser, parse_args
from phljax.train import train

if __name__ == "__main__":
    parser = config_parser(__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config = parse_args(parser=parser)
    distributed.initialize(config.coordinator_address, config.num_processes, config.process_id)
    train(config)
