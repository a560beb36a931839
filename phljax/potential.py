"""A trained model, the one way back in: energies, forces, Hessians and HVPs of molecules.

`Potential.from_workdir(path)` rebuilds the model of a training run from its work directory
(`model.json`: the hyper-parameters and data statistics; `config.json`: precision; the best orbax
checkpoint: the parameters). Evaluation, the ASE calculator, vibrations, the TS search and the
study all load models through it.

Molecules are given as (atomic numbers [N], positions [N, 3] Angstrom), one or a list. Each call
pads to a size bucket (atoms, edges and molecules rounded up to powers of two, at least 8), so
repeated calls on molecules of the same bucket reuse one compiled program (`compilations` counts
the traces). Hessians come from chunked HVPs (`derivatives.value_grad_and_block_hessian`): memory
grows with `hessian_chunk` columns at a time, not with the 3N columns.

Units: energies eV, forces eV/A, Hessians and HVPs eV/A^2.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from phljax import derivatives
from phljax.checkpoint import Checkpointer
from phljax.config import Config
from phljax.data.batching import BatchBudget, GraphBatch, edges_within, make_batch
from phljax.data.records import Molecule
from phljax.models import build_model, make_energy_fn
from phljax.models.nequip import NequIP

__all__ = ["Potential", "load_model"]


def load_model(workdir: str) -> tuple[Config, NequIP, dict]:
    """(config, model, model_spec) of the run in `workdir`, from its `config.json` and `model.json`.

    Raises:
        FileNotFoundError: naming the missing file.
    """
    paths = {name: os.path.join(workdir, name) for name in ("config.json", "model.json")}
    for path in paths.values():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: not found; is {workdir!r} the work directory of a training run?")
    with open(paths["config.json"]) as f:
        config = Config.from_json(f.read())
    with open(paths["model.json"]) as f:
        spec = json.load(f)
    return config, build_model(**spec), spec


def _bucket(x: int, floor: int = 8) -> int:
    """The smallest power of two >= max(x, floor)."""
    return max(floor, 1 << max(0, math.ceil(math.log2(max(x, 1)))))


def _as_molecules(numbers, positions) -> tuple[list[Molecule], bool]:
    """(records, single): one molecule (numbers [N], positions [N, 3]) or lists of them."""
    single = np.asarray(positions[0]).ndim == 1  # one molecule's first row is [3]; a list's first item [N, 3]
    if single:
        numbers, positions = [numbers], [positions]
    if len(numbers) != len(positions):
        raise ValueError(f"{len(numbers)} sets of atomic numbers for {len(positions)} sets of positions")
    mols = []
    for i, (z, r) in enumerate(zip(numbers, positions, strict=True)):
        r = np.asarray(r, dtype=np.float64)
        if not np.all(np.isfinite(r)):
            raise ValueError(f"molecule {i}: positions are not finite: {r.tolist()}")
        mols.append(Molecule(np.asarray(z), r, meta={"origin": f"molecule {i}"}))
    return mols, single


class Potential:
    """A model with its parameters: `energy`, `forces`, `hessian`, `hvp` of molecules.

    Attributes:
        model: the `NequIP` module; `energy_fn(params, batch) -> [n_graphs]` eV its one entry point.
        params: parameters (pytree of arrays).
        config: the training run's `Config` (None when built from a model and parameters).
        spec: the `model.json` hyper-parameters.
        compilations: how many times a program of this potential was traced (one per bucket,
            precision and kind of call).
    """

    def __init__(self, model: NequIP, params, *, config: Config | None = None, spec: dict | None = None):
        self.model = model
        self.energy_fn = make_energy_fn(model)
        self.params = params
        self.config = config
        self.spec = spec or {}
        self.compilations = 0
        self._params64 = None
        self._jitted = {}

    @classmethod
    def from_workdir(cls, workdir: str) -> Potential:
        """The best checkpoint (lowest validation loss; else the latest) of the run in `workdir`."""
        config, model, spec = load_model(workdir)
        if config.x64:
            jax.config.update("jax_enable_x64", True)
        ckpt = Checkpointer(workdir)
        try:
            params = jax.tree.map(jnp.asarray, ckpt.best_params())
        finally:
            ckpt.close()
        return cls(model, params, config=config, spec=spec)

    @property
    def elements(self) -> tuple[int, ...]:
        return tuple(self.model.elements)

    @property
    def cutoff(self) -> float:
        return float(self.model.cutoff)

    # ---- the jitted programs -------------------------------------------------------------------

    def _program(self, kind: str, x64: bool):
        key = (kind, x64)
        if key not in self._jitted:

            def energy_forces(params, batch):
                self.compilations += 1  # runs only while tracing
                e, g, _ = derivatives.batch_derivatives(self.energy_fn, params, batch)
                return e, -g

            def hvp(params, batch, v):
                self.compilations += 1
                e, g, hv = derivatives.batch_derivatives(self.energy_fn, params, batch, probes=v)
                return hv

            def hessian(params, batch, chunk):
                self.compilations += 1
                _, _, blocks = derivatives.batch_derivatives(
                    self.energy_fn, params, batch, hessian_blocks=True, chunk_size=chunk
                )
                return blocks

            fn = {"energy_forces": energy_forces, "hvp": hvp, "hessian": hessian}[kind]
            self._jitted[key] = jax.jit(fn, static_argnums=(2,) if kind == "hessian" else ())
        return self._jitted[key]

    def _context(self, x64: bool):
        return jax.enable_x64(True) if x64 else contextlib.nullcontext()

    def _params_for(self, x64: bool):
        if not x64:
            return self.params
        if self._params64 is None:
            with jax.enable_x64(True):
                self._params64 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), self.params)
        return self._params64

    def _batch(self, mols: Sequence[Molecule], x64: bool) -> GraphBatch:
        known = set(self.elements)
        for i, m in enumerate(mols):
            bad = sorted(set(m.numbers.tolist()) - known)
            if bad:
                raise ValueError(f"molecule {i}: element(s) {bad} not in the model's elements {sorted(known)}")
        n_edges = sum(len(edges_within(m.positions, self.cutoff)[0]) for m in mols)
        budget = BatchBudget(
            n_graphs=_bucket(len(mols) + 1, 2),
            n_nodes=_bucket(sum(m.n_atoms for m in mols) + 1),
            n_edges=_bucket(n_edges),
            max_atoms=_bucket(max(m.n_atoms for m in mols)),
        )
        dtype = np.float64 if x64 else np.float32
        return make_batch(mols, budget, self.cutoff, dtype=dtype, require_labels=False)

    def _x64(self, dtype) -> bool:
        if dtype is None:
            return bool(self.config and self.config.x64)
        return np.dtype(dtype) == np.float64

    # ---- public API ------------------------------------------------------------------------------

    def energy_and_forces(self, numbers, positions, *, dtype=None):
        """(energy eV, forces [N, 3] eV/A) of one molecule, or lists of both for a list of molecules.

        Args:
            numbers: atomic numbers [N] (or a list of them).
            positions: [N, 3] Angstrom (or a list of them).
            dtype: np.float64 to evaluate in double precision (default: the training precision).
        """
        mols, single = _as_molecules(numbers, positions)
        x64 = self._x64(dtype)
        with self._context(x64):
            batch = self._batch(mols, x64)
            e, f = jax.device_get(self._program("energy_forces", x64)(self._params_for(x64), batch))
        energies = [float(e[g]) for g in range(len(mols))]
        forces = [np.asarray(f[batch.graph_nodes[g, : m.n_atoms]], np.float64) for g, m in enumerate(mols)]
        return (energies[0], forces[0]) if single else (energies, forces)

    def energy(self, numbers, positions, *, dtype=None):
        """Energy, eV (a list for a list of molecules)."""
        return self.energy_and_forces(numbers, positions, dtype=dtype)[0]

    def forces(self, numbers, positions, *, dtype=None):
        """Forces -dE/dR, [N, 3] eV/A (a list for a list of molecules)."""
        return self.energy_and_forces(numbers, positions, dtype=dtype)[1]

    def hvp(self, numbers, positions, v, *, dtype=None):
        """Hessian-vector products H v, eV/A^2, without forming H.

        Args:
            v: [N, 3] or [K, N, 3] probes for one molecule (a list of them for a list of molecules).

        Returns:
            H v with v's shape (a list for a list of molecules).
        """
        mols, single = _as_molecules(numbers, positions)
        vs = [v] if single else list(v)
        vs = [np.asarray(x, np.float64) for x in vs]
        lead = [x.ndim == 3 for x in vs]
        vs = [x if x.ndim == 3 else x[None] for x in vs]
        ks = {x.shape[0] for x in vs}
        if len(ks) != 1:
            raise ValueError(f"every molecule needs the same number of probes, got {sorted(ks)}")
        (k,) = ks
        for i, (x, m) in enumerate(zip(vs, mols, strict=True)):
            if x.shape[1:] != (m.n_atoms, 3):
                raise ValueError(f"molecule {i}: probes of shape {x.shape[1:]}, expected ({m.n_atoms}, 3)")
        x64 = self._x64(dtype)
        with self._context(x64):
            batch = self._batch(mols, x64)
            probes = np.zeros((k, batch.n_nodes, 3), batch.positions.dtype)
            for g, (x, m) in enumerate(zip(vs, mols, strict=True)):
                probes[:, batch.graph_nodes[g, : m.n_atoms]] = x
            hv = np.asarray(jax.device_get(self._program("hvp", x64)(self._params_for(x64), batch, probes)))
        out = []
        for g, (m, has_k) in enumerate(zip(mols, lead, strict=True)):
            h = hv[:, batch.graph_nodes[g, : m.n_atoms]].astype(np.float64)
            out.append(h if has_k else h[0])
        return out[0] if single else out

    def hessian(self, numbers, positions, *, dtype=None, chunk_size: int | None = 16):
        """Hessian d2E/dR dR as [3N, 3N] eV/A^2 (a list for a list of molecules).

        Built from HVPs, `chunk_size` columns at a time (None: all at once). Pass
        `dtype=np.float64` for eigenvalues and frequencies.
        """
        mols, single = _as_molecules(numbers, positions)
        x64 = self._x64(dtype)
        with self._context(x64):
            batch = self._batch(mols, x64)
            chunk = None if chunk_size is None else min(int(chunk_size), 3 * batch.graph_nodes.shape[1])
            blocks = self._program("hessian", x64)(self._params_for(x64), batch, chunk)
            blocks = np.asarray(jax.device_get(blocks), np.float64)  # [N_pad, 3, A, 3]
        out = []
        for g, m in enumerate(mols):
            n = m.n_atoms
            h = blocks[batch.graph_nodes[g, :n], :, :n, :].reshape(3 * n, 3 * n)
            out.append(0.5 * (h + h.T))  # symmetric up to rounding; symmetrised for eigensolvers
        return out[0] if single else out
