"""Training: the one-device step -> the sharded step on a device mesh -> the run loop.

step.py      TrainState, make_train_step         (pure, one device)
sharded.py   data_parallel_steps, global_batches (shard_map over phljax.distributed's mesh)
loop.py      prepare -> Run, train               (epochs, checkpoints, stopping, test errors)
optim.py     make_optimizer                      (clip -> AdamW -> reduce-on-plateau)
seeds.py     run_keys, shuffle_seed              (every random stream of a run)
"""

from phljax.train.loop import Run, prepare, train
from phljax.train.optim import make_optimizer
from phljax.train.sharded import data_parallel_steps
from phljax.train.step import TrainState, make_train_step
