"""Training: optimizer, jitted steps and the epoch loop."""

from phljax.train.loop import Run, prepare, train
from phljax.train.optim import make_optimizer
from phljax.train.step import TrainState, make_eval_step, make_train_step
