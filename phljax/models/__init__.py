"""Energy models. Downstream code only sees `energy_fn(params, batch) -> [n_graphs]` eV."""

from phljax.models.energy import EnergyFn, build_model, init_params, make_energy_fn
from phljax.models.nequip import NequIP, safe_edge_geometry
