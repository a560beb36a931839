"""The one entry point to a model: `energy_fn(params, batch) -> [n_graphs]` energies in eV."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from phljax.data.batching import GraphBatch
from phljax.models.nequip import NequIP

__all__ = ["EnergyFn", "build_model", "make_energy_fn", "init_params"]

EnergyFn = Callable[[object, GraphBatch], jax.Array]  # (params, batch) -> [n_graphs] eV

# NequIP's attributes and their defaults (flax's own `parent` and `name` are not hyper-parameters)
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(NequIP) if f.name not in ("parent", "name")}


def build_model(**hyperparameters) -> NequIP:
    """A `NequIP` with validated hyper-parameters (cutoff in Angstrom, energies in eV).

    Args:
        **hyperparameters: any `NequIP` attribute (elements, channels, num_layers, lmax, cutoff,
            num_radial, radial_hidden, and the data statistics avg_num_neighbors,
            atomic_energies [len(elements)] eV, scale eV); the rest keep `NequIP`'s defaults,
            the one place they are stated. `model.json` in a work directory holds exactly these.

    Raises:
        ValueError: for an unknown name or an out-of-range value, quoting it.
    """
    unknown = set(hyperparameters) - set(_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown model hyper-parameter(s) {sorted(unknown)}; expected some of {sorted(_DEFAULTS)}")
    h = {**_DEFAULTS, **hyperparameters}
    if h["cutoff"] <= 0:
        raise ValueError(f"cutoff must be positive (Angstrom), got {h['cutoff']}")
    if h["lmax"] < 0 or h["channels"] < 1 or h["num_layers"] < 1:
        raise ValueError(
            f"need lmax >= 0, channels >= 1, num_layers >= 1; got {h['lmax']}, {h['channels']}, {h['num_layers']}"
        )
    if h["atomic_energies"] is not None and len(h["atomic_energies"]) != len(h["elements"]):
        raise ValueError(f"{len(h['atomic_energies'])} atomic energies for {len(h['elements'])} elements")
    return NequIP(
        elements=tuple(int(z) for z in h["elements"]),
        channels=int(h["channels"]),
        num_layers=int(h["num_layers"]),
        lmax=int(h["lmax"]),
        cutoff=float(h["cutoff"]),
        num_radial=int(h["num_radial"]),
        radial_hidden=int(h["radial_hidden"]),
        avg_num_neighbors=float(h["avg_num_neighbors"]),
        atomic_energies=None if h["atomic_energies"] is None else tuple(float(e) for e in h["atomic_energies"]),
        scale=float(h["scale"]),
    )


def make_energy_fn(model: NequIP) -> EnergyFn:
    """Wrap a per-atom model as `energy_fn(params, batch) -> [n_graphs]` (eV, 0 on padding)."""

    def energy_fn(params, batch: GraphBatch) -> jax.Array:
        atomic = model.apply(
            params, batch.positions, batch.numbers, batch.senders, batch.receivers, batch.edge_mask, batch.node_mask
        )  # [n_nodes] eV
        return jax.ops.segment_sum(atomic, batch.node_graph, num_segments=batch.graph_mask.shape[0])

    return energy_fn


def init_params(model: NequIP, batch: GraphBatch, key: jax.Array):
    """Initialise parameters on one batch's shapes.

    Jitted: run eagerly, `init` dispatches (and compiles) every e3nn primitive one at a time,
    ~20 s on 2 CPU cores for a tiny model against ~3 s for one compiled program; same values.
    """
    return jax.jit(model.init)(
        key,
        jnp.asarray(batch.positions),
        batch.numbers,
        batch.senders,
        batch.receivers,
        batch.edge_mask,
        batch.node_mask,
    )
