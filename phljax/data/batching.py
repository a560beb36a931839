"""Padded molecular batches with static shapes.

Molecules are flattened into one graph (nodes = atoms, edges = ordered atom pairs closer than the
cutoff, within a molecule). Every array is padded to a fixed budget so one jitted step serves the
whole epoch: padding nodes sit in an extra padding graph, padding edges are self-loops of a padding
node (zero length, masked), padding graphs have `graph_mask = False`.

Hessian labels are stored per node in "local column" form, `hessian[n, i, a, j]` =
d2E / d(R_n)_i d(R_{a-th atom of n's molecule})_j, i.e. the rows of each molecule's own
[3N, 3N] block. The batch Hessian is block diagonal, so this holds all of it in
n_nodes * 9 * max_atoms numbers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

from phljax.data.records import Molecule

__all__ = ["GraphBatch", "BatchBudget", "budget_for", "make_batch", "iterate_batches", "edges_within"]


class GraphBatch(NamedTuple):
    """A padded batch of molecules (host numpy or device arrays, same structure).

    Shapes use N = n_nodes budget, E = n_edges budget, G = n_graphs budget (last graph is padding),
    A = max atoms per molecule, K = stored probes per molecule.
    """

    positions: np.ndarray  # [N, 3] Angstrom
    numbers: np.ndarray  # [N] int32 atomic numbers, 0 on padding
    node_graph: np.ndarray  # [N] int32 graph of each node (padding nodes -> G-1)
    local_index: np.ndarray  # [N] int32 atom index within its molecule
    node_mask: np.ndarray  # [N] bool
    senders: np.ndarray  # [E] int32
    receivers: np.ndarray  # [E] int32
    edge_mask: np.ndarray  # [E] bool
    graph_mask: np.ndarray  # [G] bool
    n_atoms: np.ndarray  # [G] int32 real atoms per graph (0 on padding)
    graph_index: np.ndarray  # [G] int32 global molecule index (-1 on padding): keys fixed probes
    graph_nodes: np.ndarray  # [G, A] int32 node of each local atom (a padding node beyond n_atoms)
    energy: np.ndarray  # [G] eV
    forces: np.ndarray  # [N, 3] eV/Angstrom
    hessian: np.ndarray | None = None  # [N, 3, A, 3] eV/Angstrom^2, local column form
    hvp_probes: np.ndarray | None = None  # [K, N, 3] stored probes (dimensionless)
    hvps: np.ndarray | None = None  # [K, N, 3] eV/Angstrom^2 reference H v

    @property
    def n_graphs(self) -> int:
        return self.graph_mask.shape[0]

    @property
    def n_nodes(self) -> int:
        return self.node_mask.shape[0]


@dataclasses.dataclass(frozen=True)
class BatchBudget:
    """Static padded sizes: one set of shapes, one compilation."""

    n_graphs: int  # including the padding graph
    n_nodes: int  # including at least one padding node
    n_edges: int
    max_atoms: int  # A: local Hessian columns per node
    with_hessian: bool = False
    num_probes: int = 0  # K stored probes (fixed probes from the data), 0 if none


def edges_within(positions: np.ndarray, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """Ordered pairs (i != j) closer than `cutoff` Angstrom: senders, receivers, int32 [n_pairs]."""
    d = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    i, j = np.nonzero((d < cutoff) & ~np.eye(len(positions), dtype=bool))
    return i.astype(np.int32), j.astype(np.int32)


def _round_up(x: int, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)


def budget_for(
    molecules: Sequence[Molecule],
    batch_size: int,
    cutoff: float,
    *,
    with_hessian: bool = False,
    num_probes: int = 0,
    multiple: int = 8,
) -> BatchBudget:
    """A budget that always fits `batch_size` molecules of this data set (sized by the largest)."""
    if not molecules:
        raise ValueError("cannot size batches for an empty data set")
    max_atoms = max(m.n_atoms for m in molecules)
    max_edges = max(len(edges_within(m.positions, cutoff)[0]) for m in molecules)
    return BatchBudget(
        n_graphs=batch_size + 1,
        n_nodes=_round_up(batch_size * max_atoms + 1, multiple),
        n_edges=_round_up(max(batch_size * max_edges, 1), multiple),
        max_atoms=max_atoms,
        with_hessian=with_hessian,
        num_probes=num_probes,
    )


def make_batch(
    molecules: Sequence[Molecule],
    budget: BatchBudget,
    cutoff: float,
    indices: Sequence[int] | None = None,
    dtype=np.float32,
    *,
    require_labels: bool = True,
) -> GraphBatch:
    """Pad `molecules` into one `GraphBatch` of the budget's shapes.

    Args:
        molecules: at most `budget.n_graphs - 1` records.
        budget: static sizes.
        cutoff: edge cutoff, Angstrom.
        indices: global index of each molecule (keys fixed probes); default 0..len-1.
        dtype: float dtype of positions and labels.
        require_labels: refuse records without energy and forces (training, evaluation); False
            for inference (`phljax.Potential`), where missing labels are zeros.

    Raises:
        ValueError: if the molecules do not fit, or a label the budget asks for is missing.
    """
    G, N, E, A = budget.n_graphs, budget.n_nodes, budget.n_edges, budget.max_atoms
    if len(molecules) > G - 1:
        raise ValueError(f"{len(molecules)} molecules do not fit a budget of {G - 1} graphs")
    indices = list(range(len(molecules))) if indices is None else list(indices)
    pad_node, pad_graph = N - 1, G - 1
    positions = np.zeros((N, 3), dtype)
    numbers = np.zeros(N, np.int32)
    node_graph = np.full(N, pad_graph, np.int32)
    local_index = np.zeros(N, np.int32)
    node_mask = np.zeros(N, bool)
    senders = np.full(E, pad_node, np.int32)
    receivers = np.full(E, pad_node, np.int32)
    edge_mask = np.zeros(E, bool)
    graph_mask = np.zeros(G, bool)
    n_atoms = np.zeros(G, np.int32)
    graph_index = np.full(G, -1, np.int32)
    graph_nodes = np.full((G, A), pad_node, np.int32)
    energy = np.zeros(G, dtype)
    forces = np.zeros((N, 3), dtype)
    hessian = np.zeros((N, 3, A, 3), dtype) if budget.with_hessian else None
    K = budget.num_probes
    probes = np.zeros((K, N, 3), dtype) if K else None
    hvps = np.zeros((K, N, 3), dtype) if K else None

    node, edge = 0, 0
    for g, (m, index) in enumerate(zip(molecules, indices, strict=True)):
        where = m.meta.get("origin", f"molecule {index}")
        n = m.n_atoms
        s, r = edges_within(m.positions, cutoff)
        if n > A or node + n > N - 1 or edge + len(s) > E:
            raise ValueError(f"{where}: {n} atoms / {len(s)} edges do not fit the batch budget {budget}")
        sl = slice(node, node + n)
        positions[sl] = m.positions
        numbers[sl] = m.numbers
        node_graph[sl] = g
        local_index[sl] = np.arange(n)
        node_mask[sl] = True
        senders[edge : edge + len(s)] = s + node
        receivers[edge : edge + len(s)] = r + node
        edge_mask[edge : edge + len(s)] = True
        graph_mask[g] = True
        n_atoms[g] = n
        graph_index[g] = index
        graph_nodes[g, :n] = np.arange(node, node + n)
        if m.energy is None or m.forces is None:
            if require_labels:
                raise ValueError(f"{where}: training needs an energy and forces")
        else:
            energy[g] = m.energy
            forces[sl] = m.forces
        if hessian is not None:
            if m.hessian is None:
                raise ValueError(f"{where}: this scheme needs a reference Hessian, the record has none")
            hessian[sl, :, :n, :] = m.hessian
        if K:
            if m.num_probes < K:
                raise ValueError(f"{where}: {K} stored probes needed, the record has {m.num_probes}")
            probes[:, sl] = m.hvp_probes[:K]
            hvps[:, sl] = m.hvps[:K]
        node += n
        edge += len(s)
    return GraphBatch(
        positions, numbers, node_graph, local_index, node_mask, senders, receivers, edge_mask,
        graph_mask, n_atoms, graph_index, graph_nodes, energy, forces, hessian, probes, hvps,
    )  # fmt: skip


def iterate_batches(
    molecules: Sequence[Molecule],
    budget: BatchBudget,
    cutoff: float,
    *,
    shuffle_seed: int | None = None,
    dtype=np.float32,
) -> Iterator[GraphBatch]:
    """Fill batches greedily up to the budget, in order or shuffled by `shuffle_seed`.

    Every molecule appears exactly once per pass; `graph_index` carries its position in
    `molecules`, so fixed probes follow the molecule, not the batch.
    """
    order = np.arange(len(molecules))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(molecules))
    chunk: list[int] = []
    nodes = edges = 0
    for i in order:
        m = molecules[i]
        e = len(edges_within(m.positions, cutoff)[0])
        full = len(chunk) == budget.n_graphs - 1 or nodes + m.n_atoms > budget.n_nodes - 1
        if chunk and (full or edges + e > budget.n_edges):
            yield make_batch([molecules[j] for j in chunk], budget, cutoff, chunk, dtype)
            chunk, nodes, edges = [], 0, 0
        chunk.append(int(i))
        nodes += m.n_atoms
        edges += e
    if chunk:
        yield make_batch([molecules[j] for j in chunk], budget, cutoff, chunk, dtype)
