"""phljax: Projected Hessian Learning for E(3)-equivariant interatomic potentials in JAX.

The derivative functions work on any `energy(positions, *args) -> scalar`:

    >>> import phljax
    >>> f = phljax.forces(energy, R)              # -dE/dR
    >>> hv = phljax.hvp(energy, R, v)             # H v, forward-over-reverse, no Hessian formed
    >>> g, hv = phljax.grad_and_hvp(energy, R, v) # both from one pass
    >>> H = phljax.hessian(energy, R, chunk_size=16)
"""

from phljax import data, distributed, models, vibrations
from phljax.calculator import PHLCalculator
from phljax.checkpoint import Checkpointer
from phljax.config import Config
from phljax.data import GraphBatch, Molecule, read_h5, write_h5
from phljax.derivatives import (
    batch_derivatives,
    block_hessian,
    forces,
    grad_and_hvp,
    hessian,
    hvp,
    value_grad_and_block_hessian,
    value_grad_and_hvp,
)
from phljax.losses import (
    SCHEMES,
    LossConfig,
    energy_loss,
    force_loss,
    hessian_loss,
    hvp_loss,
    make_loss_fn,
    reference_hvp,
)
from phljax.models import NequIP, build_model, make_energy_fn
from phljax.potential import Potential
from phljax.probes import batch_probes, hutchinson_variance, molecule_probes, pool_draw
from phljax.train import TrainState, make_optimizer, make_train_step, prepare, train

__version__ = "0.1.0"
