"""phljax against the JAX peers: one jitted training step (E-F, and E-F + K curvature terms per molecule).

    python -m venv /work/venvs/mlip && /work/venvs/mlip/bin/pip install mlip           # 0.2.5 here
    python -m venv /work/venvs/nequix && /work/venvs/nequix/bin/pip install nequix     # 0.4.5 here
    python benchmarks/peer_jax.py --atoms 12 14 --out benchmarks/results/peer_jax.json   # on a quiet machine

Each peer lives in its own virtual environment (--venvs, default /work/venvs) so that the main
environment's jax / flax stay untouched; its workers run with that venv's python and never import
phljax (the repository is not on their PYTHONPATH; they import only the sibling benchmark modules
`hygiene` and `training_cost`, whose module level needs the standard library alone).

What is raced, at each size (12-14 atoms, batch 8, the same synthetic C/H/N/O molecules as
benchmarks/training_cost.py: the driver draws `training_cost.synthetic_molecule(n, seed)` for
seed 0..7 and hands every worker the same numpy arrays through a temporary .npz; labels are
zeros, which changes no cost), three tasks with the same curvature information per molecule:

- E-F: energy and forces (every framework);
- E-F-HVP K=1: plus one curvature vector per molecule. phljax: one Gaussian probe H v (`jax.jvp`
  of `jax.grad`); mlip: one sampled Hessian row (`jax.jacrev` of the summed sampled forces, its
  `HessianPredictor`); nequix: one Hessian column (`jax.jvp` of `jax.grad` along a one-hot vector);
- E-F-HVP K=4: four of them (phljax: `linearize` + `vmap`; mlip: jacrev over 4 outputs; nequix:
  `vmap` of its `jvp` over 4 columns).

Each step is written as that library's users write it:

- phljax: `training_cost.measure` (the step `experiments/run.py` runs: loss with the paper's
  weights E 1, F 0.30, H 0.09, parameter gradient, clip + AdamW + reduce-on-plateau), schemes
  "E-F", "E-F-HVP random K=1", "E-F-HVP random K=4"; the worker checks that training_cost's own
  molecules equal the driver's arrays.
- mlip: `ChemicalSystem` -> `Graph.from_chemical_system` -> `GraphDataset` (padding as its
  builder sizes it) with `process_graph_hessian(num_rows=K)` (mlip's sampled Hessian rows) as the
  graph post-processing; `ForceField.from_mlip_network(..., Properties(hessian=True))` (its
  `HessianPredictor`); `MSELoss` with weights E 1, F 0.30, H 0.09; mlip's optimizer chain around
  `optax.adamw` (`get_mlip_optimizer_chain_with_flexible_base_optimizer`, constant 1e-3); EMA
  0.99; `mlip.training.training_step.make_train_step` (what `TrainingLoop` jits). One change
  outside the step: the parameters are initialised under `jax.jit` (mlip's `ForceField.init`
  runs flax's init eagerly, ~1000 single-op compilations, 75 s for the MACE on 2 loaded cores).
- nequix: `nequix.data.preprocess_graph` + `dict_to_graphstuple` + `nequix.pft.data.
  add_hessian_col_to_graph` (one random column per molecule), `jraph.dynamically_batch` with the
  budgets of nequix's `DataLoader` (buffer factor 1); E-F: `nequix.train.loss` (MSE), K=1:
  `nequix.pft.train.loss` itself, K=4: that loss with its `jax.jvp` vmapped over 4 columns
  (`pft_loss_columns` below, the only new code; nequix trains one column); the `train_step` of
  `nequix/pft/train.py` (`eqx.filter_jit`, `filter_value_and_grad`, clip + `optax.adamw` with
  nequix's weight-decay mask, EMA) without buffer donation (the benchmark reuses one batch).
  nequix's losses need a cell (they compute the virial for stress), so each molecule sits in a
  periodic vacuum box (side = extent + 2 cutoffs + 1 A, no periodic image within the cutoff:
  the same edges as the others), translated into it.

Models, sized to phljax's default (NequIP, 16 channels of l = 0, 1, 2, 2 layers, 8 Bessel
functions, radial MLP [32], 5 A cutoff: 16,720 parameters) by parameter count, with every other
hyperparameter the library's default:

- mlip NequIP: `13x0e + 13x1o + 13x2e`, l_max 2, 2 layers, 8 RBF, radial MLP [32]: 16,274
  (its species-indexed residual linears cost parameters, so 13 channels, not 16);
- mlip MACE: 11 channels, l_max 2, correlation 3, 2 layers, 8 RBF, radial MLP [32, 32]: 16,029;
- nequix: `32x0e + 32x1o + 32x2e`, lmax 2, 2 layers, 8 RBF, radial MLP [32] (its last layer is
  scalar-only and it has no readout MLP, so 16 channels would be 6.1k parameters): 16,436.

Padding: phljax rounds its budget up to multiples of 8 (12 atoms: 104 nodes, 1040 edge slots
for 988 edges), mlip pads to batch x the largest molecule (97 nodes, 1040), nequix's loader to
batch x the mean (97 nodes, 988). Peers' steps are called through their compiled executables
(calling the jitted function after `.lower().compile()` compiles again); phljax's through its
`jax.jit` as training_cost does. All workers of a size live at once: at 12 atoms 1.1-2.3 GB RSS
each (shared libraries counted in each), ~20 GB summed; run fewer --frameworks at a time if
memory is short.

All float32, on --platform (default cpu: the nequix wheel pulls jax[cuda12]; with JAX_PLATFORMS
unset it probes CUDA, prints a cuInit error and falls back to the CPU). Timing follows
benchmarks/hygiene.py: every (framework, task) is a persistent worker (`hygiene.Worker`, threads
pinned to the driver's CPUs with `hygiene.pinned_env` / `hygiene.pin`) that compiles its step and
then serves it; once all are compiled, one `hygiene.interleave` per size times every step in
alternating rounds, so all frameworks see the same machine. Ratios are medians of per-round
ratios with their interquartile range: each framework against phljax at the same task (the race)
and against phljax E-F. FLOPs are XLA's `cost_analysis()` of each compiled step
(`training_cost.xla_cost`).

Records (JSON list): framework, version, task, curvature, model, n_atoms, batch_size, n_params,
n_nodes / n_edges (padded), compile_time_s, flops, bytes_accessed, step_time_s (median of round
medians), round_medians_s, steps_per_round, ratio_to_phljax_same_task, ratio_to_phljax_ef,
peak_rss_bytes, loaded, hygiene (load before / after, rounds, pin); a worker that fails gives
{"framework", "task", "n_atoms", "error"} and the rest go on.

Checked here (jax 0.10.2 in all three environments): mlip 0.2.5 installs and runs on the CPU;
nequix 0.4.5 installs (with ~5.6 GB of unused CUDA wheels) and runs on the CPU with
JAX_PLATFORMS=cpu. Its OpenEquivariance kernels (`kernel=True`, extra "oeq") are GPU-only and are
not used.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import hygiene  # sibling module: interleaved timing, pinned threads, load marking

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ELEMENTS = (1, 6, 7, 8)
CUTOFF = 5.0
WEIGHTS = {"energy": 1.0, "forces": 0.30, "hessian": 0.09}  # the paper's, for every framework
LEARNING_RATE = 1e-3
GRAD_CLIP = 10.0
TASKS = {"E-F": 0, "E-F-HVP K=1": 1, "E-F-HVP K=4": 4}  # task -> curvature terms per molecule
PHLJAX_SCHEMES = {"E-F": "E-F", "E-F-HVP K=1": "E-F-HVP random K=1", "E-F-HVP K=4": "E-F-HVP random K=4"}
FRAMEWORKS = ("phljax", "mlip-nequip", "mlip-mace", "nequix")
VENV = {"mlip-nequip": "mlip", "mlip-mace": "mlip", "nequix": "nequix"}  # peer -> venv under --venvs
CURVATURE = {
    "phljax": "Gaussian probes H v: jax.jvp of jax.grad (K > 1: linearize + vmap)",
    "mlip-nequip": "sampled Hessian rows: jax.jacrev of the summed sampled forces (HessianPredictor)",
    "mlip-mace": "sampled Hessian rows: jax.jacrev of the summed sampled forces (HessianPredictor)",
    "nequix": "Hessian columns: jax.jvp of jax.grad along one-hot vectors (nequix.pft; K > 1: vmap)",
}
BASE = "phljax E-F"


# ----------------------------------------------------------------------------- workers


def _compile(jitted, *call_args) -> tuple[object, dict]:
    """`jitted.lower(*call_args).compile()`, timed, with XLA's cost analysis."""
    import time

    import training_cost  # sibling script; its module level needs only the standard library

    t0 = time.perf_counter()
    compiled = jitted.lower(*call_args).compile()
    xla = getattr(compiled, "compiled", compiled)  # equinox wraps jax's Compiled in its own
    info = {"compile_time_s": time.perf_counter() - t0, **training_cost.xla_cost(xla)}
    return compiled, info


def _n_params(tree) -> int:
    import jax

    return int(sum(x.size for x in jax.tree.leaves(tree) if hasattr(x, "size")))


def _columns(rng, n_atoms: int, batch: int, k: int):
    """[batch, k] distinct random degrees of freedom (Hessian rows / columns) per molecule."""
    return [rng.choice(3 * n_atoms, size=k, replace=False) for _ in range(batch)]


def build_phljax(numbers, positions, k: int, args) -> tuple:
    """training_cost's own phljax step (its `measure`), on molecules checked equal to the driver's."""
    import importlib.metadata

    import numpy as np
    import training_cost

    n, batch = positions.shape[1], positions.shape[0]
    for seed in range(batch):  # training_cost.setup draws the same seeds: same geometries
        m = training_cost.synthetic_molecule(n, seed)
        if not (np.array_equal(m.numbers, numbers[seed]) and np.allclose(m.positions, positions[seed])):
            raise RuntimeError(f"training_cost's molecule {seed} differs from the driver's")
    label = PHLJAX_SCHEMES[args.task]
    probe = "none" if k == 0 else "random"
    model_kwargs = {"channels": 16, "lmax": 2, "num_layers": 2}
    record, step, traces = training_cost.measure(probe, k, n, batch, model_kwargs, None)
    info = {key: record.get(key) for key in ("compile_time_s", "flops", "bytes_accessed", "n_params", "n_edges")}
    from phljax import data as phdata

    budget = phdata.budget_for([training_cost.synthetic_molecule(n, s) for s in range(batch)], batch, CUTOFF)
    info.update(
        n_nodes_padded=budget.n_nodes,
        n_edges_padded=budget.n_edges,
        version=importlib.metadata.version("phljax"),
        scheme=label,
        model="phljax.models.NequIP: 16 channels of l = 0, 1, 2, 2 layers, 8 Bessel, radial MLP [32]",
        peak_bytes=record.get("peak_bytes"),
    )
    return step, info


def build_mlip(numbers, positions, k: int, args, architecture: str) -> tuple:
    """mlip's NequIP or MACE training step, as its TrainingLoop builds it."""
    import importlib.metadata
    from functools import partial

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from mlip.data import ChemicalSystem, DatasetInfo, pad_systems_hessians, process_graph_hessian
    from mlip.data.graph_dataset import GraphDataset
    from mlip.data.helpers.dummy_init_graph import get_dummy_graph_for_model_init
    from mlip.data.helpers.neighbor_analysis import compute_avg_num_neighbors
    from mlip.graph import Graph
    from mlip.models import ForceField, Mace, Nequip
    from mlip.models.loss import MSELoss
    from mlip.training import OptimizerConfig, get_mlip_optimizer_chain_with_flexible_base_optimizer
    from mlip.training.ema import exponentially_moving_average
    from mlip.training.training_state import init_training_state
    from mlip.training.training_step import make_train_step
    from mlip.typing.properties import Properties

    batch, n = positions.shape[:2]
    systems = [
        ChemicalSystem(
            atomic_numbers=np.asarray(numbers[i]),
            positions=np.asarray(positions[i]),
            energy=0.0,
            forces=np.zeros((n, 3)),
            hessian=np.zeros((n, 3, n, 3)) if k else None,
        )
        for i in range(batch)
    ]
    if k:
        systems = pad_systems_hessians(systems)
    graphs = [Graph.from_chemical_system(s, CUTOFF) for s in systems]
    max_edges = max(int(g.n_edge.sum()) for g in graphs)
    np.random.seed(0)  # noqa: NPY002 (process_graph_hessian samples the rows with the global np.random)
    dataset = GraphDataset(
        graphs,
        batch_size=batch,
        max_n_node=n,
        max_n_edge=-(-max_edges // 2),  # the builder's rule: its budget is batch x max_n_edge x 2
        shuffle=False,
        graph_postprocessing=[partial(process_graph_hessian, num_rows=k)] if k else None,
    )
    graph = next(iter(dataset))
    info_ds = DatasetInfo(
        atomic_energies_map={z: 0.0 for z in ELEMENTS},
        graph_cutoff_angstrom=CUTOFF,
        avg_num_neighbors=compute_avg_num_neighbors(graphs),
    )
    if architecture == "nequip":
        ch = args.mlip_nequip_channels
        config = Nequip.Config(
            num_layers=2, target_irreps=f"{ch}x0e + {ch}x1o + {ch}x2e", l_max=2, num_rbf=8, radial_mlp_hidden=[32]
        )
        network = Nequip(config, info_ds)
        model = f"mlip Nequip: {ch}x0e + {ch}x1o + {ch}x2e, l_max 2, 2 layers, 8 RBF, radial MLP [32]"
    else:
        ch = args.mlip_mace_channels
        config = Mace.Config(
            num_layers=2, num_channels=ch, l_max=2, correlation=3, num_rbf=8, radial_mlp_hidden=[32, 32]
        )
        network = Mace(config, info_ds)
        model = f"mlip Mace: {ch} channels, l_max 2, correlation 3, 2 layers, 8 RBF, radial MLP [32, 32]"
    # ForceField.from_mlip_network, with the parameter initialisation under jax.jit: mlip runs
    # flax's init eagerly, which compiles ~1000 single ops (75 s for the MACE on 2 loaded cores)
    properties = Properties(hessian=k > 0)
    ForceField.validate_properties(properties, network.available_properties)
    predictor = ForceField.get_predictor_class(properties, network.config)(
        mlip_network=network,
        required_properties=properties,
        energy_head=ForceField.get_energy_head(network.config, properties, network),
    )
    params = jax.jit(predictor.init)(jax.random.key(0), get_dummy_graph_for_model_init())
    force_field = ForceField(predictor=predictor, params=params)
    loss = MSELoss(
        energy_weight_schedule=lambda _: WEIGHTS["energy"],
        forces_weight_schedule=lambda _: WEIGHTS["forces"],
        stress_weight_schedule=lambda _: 0.0,
        hessian_weight_schedule=lambda _: WEIGHTS["hessian"],
    )
    lr = dict(init_learning_rate=LEARNING_RATE, peak_learning_rate=LEARNING_RATE, final_learning_rate=LEARNING_RATE)
    optimizer = get_mlip_optimizer_chain_with_flexible_base_optimizer(
        optax.adamw, OptimizerConfig(grad_norm=GRAD_CLIP, **lr)
    )
    ema_fun = exponentially_moving_average(0.99)
    state = jax.tree.map(jnp.asarray, init_training_state(force_field.params, optimizer, ema_fun))
    train_step = make_train_step(force_field.predictor, loss, optimizer, ema_fun, float(batch))
    compiled, info = _compile(train_step, state, graph, 0)

    def step():  # the compiled executable of the jitted step (calling the jit again would recompile)
        nonlocal state
        state, _ = compiled(state, graph, 0)
        jax.block_until_ready(state)

    info.update(
        version=importlib.metadata.version("mlip"),
        n_params=_n_params(force_field.params),
        n_edges=sum(int(g.n_edge.sum()) for g in graphs),
        n_nodes_padded=int(graph.n_node.sum()),
        n_edges_padded=int(graph.n_edge.sum()),
        model=model,
    )
    return step, info


def pft_loss_columns(model, graph, energy_weight, force_weight, stress_weight, hessian_weight):
    """`nequix.pft.train.loss` for K Hessian columns per molecule: graph.nodes["vs"] and
    ["hessian_col"] are [n_nodes, K, 3]; its `jax.jvp` of the energy gradient is vmapped over K.
    Everything else is nequix's (energy MAE per atom, force L2, stress MAE, Hessian-column MAE)."""
    import jax
    import jax.numpy as jnp
    import jraph
    from nequix.model import node_graph_idx

    def total_energy_fn(positions_eps):
        positions, eps = positions_eps
        eps_sym = (eps + eps.swapaxes(1, 2)) / 2
        eps_sym_per_node = jnp.repeat(
            eps_sym, graph.n_node, axis=0, total_repeat_length=graph.nodes["positions"].shape[0]
        )
        positions = positions + jnp.einsum("ik,ikj->ij", positions, eps_sym_per_node)
        cell_per_edge = jnp.repeat(
            graph.globals["cell"], graph.n_edge, axis=0, total_repeat_length=graph.edges["shifts"].shape[0]
        )
        offsets = jnp.einsum("ij,ijk->ik", graph.edges["shifts"], cell_per_edge)
        r = positions[graph.senders] - positions[graph.receivers] + offsets
        node_energies = model.node_energies(r, graph.nodes["species"], graph.senders, graph.receivers)
        return jnp.sum(node_energies), node_energies

    eps = jnp.zeros_like(graph.globals["cell"])
    node_mask = jraph.get_node_padding_mask(graph)
    graph_mask = jraph.get_graph_padding_mask(graph)
    grad_energy = jax.grad(total_energy_fn, has_aux=True)
    primal = (graph.nodes["positions"], eps)
    (minus_forces, virial), node_energies = grad_energy(primal)

    def column(v):  # nequix's one-column HVP
        return jax.jvp(grad_energy, (primal,), ((v, eps),), has_aux=True)[1][0]

    hessian_col = jax.vmap(column, in_axes=1, out_axes=1)(graph.nodes["vs"])  # [n_nodes, K, 3]
    graph_energies = jraph.segment_sum(
        node_energies, node_graph_idx(graph), num_segments=graph.n_node.shape[0], indices_are_sorted=True
    )
    det = jnp.abs(jnp.linalg.det(graph.globals["cell"]))[:, None, None]
    stress = virial / jnp.where(det > 0.0, det, 1.0)
    hessian_col = jnp.where(node_mask[:, None, None], hessian_col, 0.0)
    forces = -jnp.where(node_mask[:, None], minus_forces, 0.0)
    stress = jnp.where(graph_mask[:, None, None], stress, 0.0)
    energy = graph_energies[:, 0]
    energy_loss = jnp.sum(jnp.abs(energy - graph.globals["energy"]) / graph.n_node * graph_mask) / jnp.sum(graph_mask)
    diff2 = jnp.sum((forces - graph.nodes["forces"]) ** 2, axis=-1)
    safe = jnp.where(diff2 == 0.0, 1.0, diff2)
    force_loss = jnp.sum(jnp.where(diff2 == 0.0, 0.0, jnp.sqrt(safe)) * node_mask) / jnp.sum(node_mask)
    stress_loss = jnp.sum(jnp.abs(stress - graph.globals["stress"]) * graph_mask[:, None, None]) / (
        9 * jnp.sum(graph_mask)
    )
    k = hessian_col.shape[1]
    hessian_loss = jnp.sum(jnp.abs(hessian_col - graph.nodes["hessian_col"]) * node_mask[:, None, None]) / (
        3 * k * jnp.sum(node_mask)
    )
    total = energy_weight * energy_loss + force_weight * force_loss + stress_weight * stress_loss
    return total + hessian_weight * hessian_loss, {"hessian_mae": hessian_loss}


def build_nequix(numbers, positions, k: int, args) -> tuple:
    """nequix's PFT training step (nequix/pft/train.py), E-F through nequix.train.loss."""
    import importlib.metadata
    from functools import partial

    import ase
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jraph
    import numpy as np
    import optax
    from ase.calculators.singlepoint import SinglePointCalculator
    from nequix.data import atomic_numbers_to_indices, dict_to_graphstuple, preprocess_graph
    from nequix.model import Nequix, weight_decay_mask
    from nequix.pft.data import add_hessian_col_to_graph
    from nequix.pft.train import loss as pft_loss
    from nequix.train import loss as efs_loss

    batch, n = positions.shape[:2]
    indices = atomic_numbers_to_indices(list(ELEMENTS))
    rng = np.random.default_rng(0)
    cols = _columns(rng, n, batch, max(k, 1))
    graphs = []
    for i in range(batch):
        pos = np.asarray(positions[i], np.float64)
        extent = pos.max(0) - pos.min(0)
        box = float(extent.max() + 2 * CUTOFF + 1.0)  # no periodic image within the cutoff
        atoms = ase.Atoms(numbers=numbers[i], positions=pos - pos.min(0) + CUTOFF, cell=np.eye(3) * box, pbc=True)
        atoms.calc = SinglePointCalculator(atoms, energy=0.0, forces=np.zeros((n, 3)), stress=np.zeros(6))
        g = dict_to_graphstuple(preprocess_graph(atoms, indices, CUTOFF, True))
        hessian_ref = np.zeros((3 * n, 3 * n), np.float32)
        if k == 1:
            g = add_hessian_col_to_graph(g, hessian_ref, int(cols[i][0]))
        elif k > 1:
            cs = [add_hessian_col_to_graph(g, hessian_ref, int(c)).nodes for c in cols[i]]
            stack = {key: np.stack([c[key] for c in cs], axis=1) for key in ("vs", "hessian_col")}
            g = g._replace(nodes={**g.nodes, **stack})  # [n, K, 3]
        graphs.append(g)
    n_edges = sum(int(g.n_edge[0]) for g in graphs)
    avg_neighbors = float(np.mean([g.n_edge[0] / g.n_node[0] for g in graphs]))
    # nequix's DataLoader budgets (buffer factor 1): batch x mean nodes + 1, batch x mean edges
    graph = next(jraph.dynamically_batch(iter(graphs), n_node=batch * n + 1, n_edge=n_edges, n_graph=batch + 1))
    graph = jax.tree.map(jnp.asarray, graph)

    ch = args.nequix_channels
    hidden = f"{ch}x0e + {ch}x1o + {ch}x2e"
    model = Nequix(
        jax.random.key(0),
        n_species=len(ELEMENTS),
        lmax=2,
        cutoff=CUTOFF,
        hidden_irreps=hidden,
        n_layers=2,
        radial_basis_size=8,
        radial_mlp_size=32,
        radial_mlp_layers=1,
        avg_n_neighbors=avg_neighbors,
    )
    optim = optax.chain(
        optax.clip_by_global_norm(GRAD_CLIP),
        optax.adamw(learning_rate=LEARNING_RATE, weight_decay=0.0, mask=weight_decay_mask(model)),
    )
    opt_state = optim.init(eqx.filter(model, eqx.is_array))
    ema_model = jax.tree.map(lambda x: x.copy(), model)
    w = dict(energy_weight=WEIGHTS["energy"], force_weight=WEIGHTS["forces"], stress_weight=0.0)
    if k == 0:
        loss_fn = partial(efs_loss, **w, loss_type="mse")
    elif k == 1:
        loss_fn = partial(pft_loss, **w, hessian_weight=WEIGHTS["hessian"])
    else:
        loss_fn = partial(pft_loss_columns, **w, hessian_weight=WEIGHTS["hessian"])
    ema_decay = 0.999

    @eqx.filter_jit(donate="none")  # nequix donates "all"; here one batch is reused every step
    def train_step(model, ema_model, loss_fn, step, opt_state, graph):
        (total_loss, metrics), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, graph)
        updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        model = eqx.apply_updates(model, updates)
        decay = jnp.minimum(ema_decay, (1 + step) / (10 + step))
        ema_params, ema_static = eqx.partition(ema_model, eqx.is_array)
        model_params = eqx.filter(model, eqx.is_array)
        new_ema = jax.tree.map(lambda ep, mp: ep * decay + mp * (1 - decay), ema_params, model_params)
        return model, eqx.combine(ema_static, new_ema), opt_state, total_loss, metrics

    step_no = jnp.array(0)
    compiled, info = _compile(train_step, model, ema_model, loss_fn, step_no, opt_state, graph)
    state = [model, ema_model, opt_state]

    def step():  # equinox's compiled wrapper (splits the static arguments out as filter_jit does)
        m, e, o, total_loss, _ = compiled(state[0], state[1], loss_fn, step_no, state[2], graph)
        state[:] = [m, e, o]
        jax.block_until_ready((m, o, total_loss))

    info.update(
        version=importlib.metadata.version("nequix"),
        n_params=_n_params(eqx.filter(model, eqx.is_array)),
        n_edges=n_edges,
        n_nodes_padded=int(graph.n_node.sum()),
        n_edges_padded=int(graph.n_edge.sum()),
        model=f"nequix Nequix: {hidden}, lmax 2, 2 layers, 8 RBF, radial MLP [32]",
    )
    return step, info


def worker_main(args) -> None:
    """A worker: pin, build the framework's step for --task on the --npz molecules, serve it."""
    pinned = hygiene.pin()
    if args.mem_limit_gb > 0:
        import resource

        limit = int(args.mem_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import numpy as np

    with np.load(args.npz) as data:
        numbers, positions = data["numbers"], data["positions"]
    import time

    k = TASKS[args.task]
    fw = args.worker
    t0 = time.perf_counter()
    if fw == "phljax":
        step, info = build_phljax(numbers, positions, k, args)
    elif fw in ("mlip-nequip", "mlip-mace"):
        step, info = build_mlip(numbers, positions, k, args, fw.split("-")[1])
    elif fw == "nequix":
        step, info = build_nequix(numbers, positions, k, args)
    else:
        raise SystemExit(f"unknown framework {fw}")
    import jax

    t1 = time.perf_counter()
    step()  # one real step before serving: a failure shows here, not in the timed rounds
    info.update(
        setup_s=t1 - t0,  # data, model, initialisation and compilation
        first_step_s=time.perf_counter() - t1,
        framework=fw,
        task=args.task,
        curvature_per_molecule=k,
        curvature=CURVATURE[fw] if k else "none",
        jax_version=jax.__version__,
        device=str(jax.devices()[0].device_kind),
        pin=pinned,
    )
    hygiene.serve({"step": step}, info)


# ----------------------------------------------------------------------------- driver


def worker_command(fw: str, task: str, npz: str, args) -> tuple[list[str], dict[str, str]]:
    """(command, environment) of one worker. phljax: this python with the repository importable;
    a peer: its venv's python, the repository off its path."""
    env = hygiene.pinned_env()
    if args.platform != "default":
        env["JAX_PLATFORMS"] = args.platform
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # several workers may share one GPU
    if fw == "phljax":
        python = sys.executable
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    else:
        python = os.path.join(args.venvs, VENV[fw], "bin", "python")
        env.pop("PYTHONPATH", None)
    cmd = [python, os.path.abspath(__file__), "--worker", fw, "--task", task, "--npz", npz]
    cmd += ["--mem-limit-gb", str(args.mem_limit_gb), "--mlip-nequip-channels", str(args.mlip_nequip_channels)]
    cmd += ["--mlip-mace-channels", str(args.mlip_mace_channels), "--nequix-channels", str(args.nequix_channels)]
    return cmd, env


def write_molecules(n: int, batch: int, path: str) -> None:
    """training_cost's synthetic molecules (seeds 0..batch-1) as numpy arrays for every worker."""
    import numpy as np
    import training_cost

    mols = [training_cost.synthetic_molecule(n, seed) for seed in range(batch)]
    np.savez(path, numbers=np.stack([m.numbers for m in mols]), positions=np.stack([m.positions for m in mols]))


def start_workers(configs: list[tuple[str, str]], npz: str, args, log=print) -> tuple[dict, dict]:
    """Start (and so compile) one worker per (framework, task), --start-jobs at a time:
    ({label: Worker}, {label: error})."""
    workers, failed = {}, {}

    def start(fw_task):
        fw, task = fw_task
        cmd, env = worker_command(fw, task, npz, args)
        if not os.path.exists(cmd[0]):
            raise hygiene.WorkerError(f"no python at {cmd[0]}: install the peer into its venv (see --help)")
        return hygiene.Worker(cmd, env=env)

    with ThreadPoolExecutor(max_workers=max(1, args.start_jobs)) as pool:
        futures = {f"{fw} {task}": pool.submit(start, (fw, task)) for fw, task in configs}
        for label, fut in futures.items():
            try:
                w = workers[label] = fut.result()
                i = w.info
                log(f"  {label:<26} compiled in {i['compile_time_s']:.1f} s, {i['n_params']} params, "
                    f"{(i.get('flops') or 0) / 1e9:.3f} GFLOP")  # fmt: skip
            except hygiene.WorkerError as e:
                failed[label] = str(e)
                log(f"  {label:<26} failed: {e}")
    return workers, failed


def ratio_between(num: dict, den: dict) -> dict | None:
    """Per-round ratio num / den of two records of one interleaved session: median, quartiles, range."""
    return hygiene.per_round_ratio(num, den)


def race_size(n: int, args, log=print) -> list[dict]:
    """Every (framework, task) at n atoms: compiled in persistent workers, timed in one interleave."""
    configs = [(fw, task) for task in args.tasks for fw in args.frameworks]
    records = []
    with tempfile.TemporaryDirectory(prefix="peer_jax-") as tmp:
        npz = os.path.join(tmp, f"molecules_{n}.npz")
        write_molecules(n, args.batch_size, npz)
        compile_load = hygiene.load_state()
        workers, failed = start_workers(configs, npz, args, log)
        try:
            for label, error in failed.items():
                fw, task = label.split(" ", 1)
                records.append({"framework": fw, "task": task, "n_atoms": n, "batch_size": args.batch_size,
                                "error": error[-400:]})  # fmt: skip
            if not workers:
                return records
            base = BASE if BASE in workers else None
            timed = hygiene.interleave(
                {label: (w, "step") for label, w in workers.items()},
                base,
                rounds=args.rounds,
                round_s=args.round_s,
                max_steps=args.max_steps,
                log=log,
            )
            for label, w in workers.items():
                rec = timed["labels"][label]
                keep = ("version", "n_params", "compile_time_s", "flops", "bytes_accessed", "n_edges",
                        "n_nodes_padded", "n_edges_padded", "peak_bytes", "model", "curvature", "scheme",
                        "jax_version", "device")  # fmt: skip
                r = {"framework": w.info["framework"], "task": w.info["task"], "n_atoms": n,
                     "batch_size": args.batch_size, "curvature_per_molecule": w.info["curvature_per_molecule"],
                     **{key: w.info[key] for key in keep if key in w.info},
                     "step_time_s": rec["step_time_s"], "round_medians_s": rec["round_medians_s"],
                     "steps_per_round": timed["steps"][label], "peak_rss_bytes": w.peak_rss_bytes,
                     "ratio_to_phljax_ef": rec.get("ratio"),
                     "loaded": timed["loaded"],
                     "hygiene": {"load_before": timed["load_before"], "load_after": timed["load_after"],
                                 "foreign_cpu": timed["foreign_cpu"],
                                 "compile_load": compile_load, "rounds": timed["rounds"],
                                 "round_s": timed["round_s"], "pin": w.info.get("pin")}}  # fmt: skip
                records.append(r)
        finally:
            for w in workers.values():
                w.close()
    by = {(r["framework"], r["task"]): r for r in records if "error" not in r}
    for r in records:
        same = by.get(("phljax", r["task"]))
        if "error" not in r and same is not None:
            r["ratio_to_phljax_same_task"] = ratio_between(r, same)
    return records


# ----------------------------------------------------------------------------- reporting


def table(records: list[dict]) -> str:
    """Markdown: per size and task, each framework's step (ms), GFLOP, compile time, and its time
    and FLOPs over phljax's at the same task (time: median of per-round ratios [interquartile
    range]), and its time over phljax E-F."""
    lines = [
        "| atoms | task | framework | params | step (ms) | GFLOP | compile (s) "
        "| time / phljax (same task) | FLOPs / phljax (same task) | time / phljax E-F |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    tasks = [t for t in TASKS if any(r["task"] == t for r in records)]
    frameworks = [f for f in FRAMEWORKS if any(r["framework"] == f for r in records)]
    frameworks += sorted({r["framework"] for r in records} - set(frameworks))
    by = {(r["framework"], r["task"], r["n_atoms"]): r for r in records}
    for n in sorted({r["n_atoms"] for r in records}):
        for task in tasks:
            phl = by.get(("phljax", task, n), {})
            for fw in frameworks:
                r = by.get((fw, task, n))
                if r is None:
                    continue
                if "error" in r:
                    lines.append(f"| {n} | {task} | {fw} | failed: {r['error'][:100]} | | | | | | |")
                    continue
                flops = r.get("flops")
                gflop = f"{flops / 1e9:.3f}" if flops is not None else ""
                flop_ratio = f"{flops / phl['flops']:.2f}x" if flops is not None and phl.get("flops") else ""
                lines.append(
                    f"| {n} | {task} | {fw} | {r.get('n_params', '')} | {1e3 * r['step_time_s']:.1f} | {gflop} "
                    f"| {r.get('compile_time_s', 0):.1f} | {hygiene.ratio_text(r.get('ratio_to_phljax_same_task'))} "
                    f"| {flop_ratio} | {hygiene.ratio_text(r.get('ratio_to_phljax_ef'))} |"
                )
    return "\n".join(lines)


def summary(records: list[dict]) -> list[str]:
    """One line per (size, task): the fastest framework and each other's time over it (median of
    the per-round ratios to phljax, divided through)."""
    out = []
    ok = [r for r in records if "error" not in r and r.get("step_time_s")]
    for n in sorted({r["n_atoms"] for r in ok}):
        for task in [t for t in TASKS if any(r["task"] == t and r["n_atoms"] == n for r in ok)]:
            rs = [r for r in ok if r["task"] == task and r["n_atoms"] == n]
            # per-round ratios to phljax where available (drift cancels), else the medians
            rel = {}
            for r in rs:
                ratio = r.get("ratio_to_phljax_same_task")
                rel[r["framework"]] = ratio["median"] if ratio else r["step_time_s"]
            if "phljax" not in rel or any(not r.get("ratio_to_phljax_same_task") for r in rs):
                rel = {r["framework"]: r["step_time_s"] for r in rs}
            best = min(rel, key=rel.get)
            others = ", ".join(f"{fw} {rel[fw] / rel[best]:.2f}x" for fw in sorted(rel, key=rel.get) if fw != best)
            out.append(f"{n} atoms, {task}: fastest {best}" + (f"; slower: {others}" if others else ""))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atoms", type=int, nargs="+", default=[12, 14])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS), choices=FRAMEWORKS)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--rounds", type=int, default=12, help="interleaved rounds (benchmarks/hygiene.py)")
    p.add_argument("--round-s", type=float, default=0.6, help="seconds of steps per label and round (>= 1 step)")
    p.add_argument("--max-steps", type=int, default=10, help="at most this many steps per label and round")
    p.add_argument("--start-jobs", type=int, default=1,
                   help="workers compiling at once (1: compile times are not inflated by each other)")  # fmt: skip
    p.add_argument("--venvs", default="/work/venvs", help="folder of the peers' venvs (mlip/, nequix/)")
    p.add_argument("--platform", default="cpu", help='JAX_PLATFORMS of every worker ("default": leave unset)')
    p.add_argument("--mem-limit-gb", type=float, default=0.0, help="address-space cap per worker (0: none)")
    p.add_argument("--mlip-nequip-channels", type=int, default=13)
    p.add_argument("--mlip-mace-channels", type=int, default=11)
    p.add_argument("--nequix-channels", type=int, default=32)
    p.add_argument("--out", default="benchmarks/results/peer_jax.json")
    p.add_argument("--from-json", nargs="+", metavar="FILE", help="print the table of these records (no timing)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--task", help=argparse.SUPPRESS)
    p.add_argument("--npz", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.worker:
        worker_main(args)
        return
    records = []
    for path in args.from_json or []:
        with open(path) as f:
            records += json.load(f)
    if not args.from_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        for n in args.atoms:
            print(f"{n} atoms, batch {args.batch_size}: compiling {len(args.frameworks) * len(args.tasks)} workers",
                  flush=True)  # fmt: skip
            records += race_size(n, args)
            with open(args.out + ".tmp", "w") as f:  # keep what is measured so far
                json.dump(records, f, indent=2)
            os.replace(args.out + ".tmp", args.out)
    print()
    print(table(records))
    print()
    print("\n".join(summary(records)))
    versions = sorted({(r["framework"], r.get("version")) for r in records if r.get("version")})
    print("\nversions: " + ", ".join(f"{fw} {v}" for fw, v in versions))
    if any(r.get("loaded") for r in records):
        print("\nWARNING: timed on a loaded machine (see the records' 'hygiene'): not for publishing")
    if not args.from_json:
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
