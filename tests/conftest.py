"""Shared fixtures: a tiny NequIP, synthetic Morse-labelled data, float64 derivative functions.

Compiling third-order derivatives dominates the suite's run time, so:
- the XLA CPU backend runs without LLVM optimisation (halves compile time; the tests' arrays are tiny);
- a persistent compilation cache, fresh for each session, lets an identical program compiled twice
  (a new `jax.jit` object, or the same step in a `python experiments/run.py` subprocess) load the
  first compilation instead of compiling again; `SUBPROCESS_ENV` passes it to subprocesses;
- the jitted functions are built once per session and shared by the tests.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import runpy
import shutil
import sys
import tempfile
import types

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_backend_optimization_level=0".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

_CACHE = tempfile.mkdtemp(prefix="phljax-test-jax-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE)

sys.path.insert(0, os.path.dirname(__file__))

from synthetic import synthetic_molecules  # noqa: E402

import phljax  # noqa: E402
from phljax import data as phdata  # noqa: E402
from phljax.models import build_model, init_params, make_energy_fn  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBPROCESS_ENV = {
    **os.environ,
    "XLA_FLAGS": os.environ["XLA_FLAGS"],
    "JAX_COMPILATION_CACHE_DIR": _CACHE,
    "JAX_PLATFORMS": "cpu",
}

# The tiny model every test uses: compile time, not accuracy, is what matters here.
TINY = {"channels": 4, "lmax": 1, "num_layers": 1}
CUTOFF64 = 3.0  # Angstrom, the float64 test model's cutoff (> every pair distance of the synthetic molecules)


@pytest.fixture
def x64():
    """Run the test with 64-bit floats enabled."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="session")
def molecules():
    """24 distorted H2O/NH3/CH4/H2CO geometries (6 each) with exact Morse energies, forces, Hessians."""
    return synthetic_molecules(n_per_molecule=6, seed=0)


@pytest.fixture(scope="session")
def h5_path(molecules, tmp_path_factory):
    """The synthetic molecules as an ANI-style HDF5 file (Hartree, Angstrom)."""
    path = tmp_path_factory.mktemp("data") / "synthetic.h5"
    phljax.write_h5(path, molecules)
    return str(path)


@pytest.fixture(scope="session")
def tiny_config(h5_path, tmp_path_factory):
    """A CPU-sized training config on the synthetic file (same settings as the CLI tests use)."""
    return phljax.Config(
        data=(h5_path,),
        epochs=2,
        batch_size=8,
        progress=False,
        workdir=str(tmp_path_factory.mktemp("run") / "default"),
        **TINY,
    )


@pytest.fixture(scope="session")
def run(tiny_config):
    """`phljax.train.prepare` of the tiny config (float32, E-F-HVP random)."""
    return phljax.prepare(tiny_config)


def count_traces(run) -> dict:
    """Wrap `run.energy_fn` so that `counter['n']` counts how often it is traced (called in Python)."""
    counter = {"n": 0}
    run.energy_fn = _counted(run.energy_fn, counter)
    return counter


def _counted(energy_fn, counter):
    def counted(params, batch):
        counter["n"] += 1  # jitted functions call it only while tracing
        return energy_fn(params, batch)

    return counted


def cli_args(probe_flags, data, workdir, epochs=2, batch_size=8):
    """`experiments/run.py` flags for the tiny config (`data` None: no --data, the bundled set)."""
    data_flags = [] if data is None else ["--data", data]
    args = [*probe_flags, *data_flags, "--epochs", str(epochs), "--batch-size", str(batch_size), "--workdir", workdir]
    for key, value in TINY.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return [*args, "--no-progress"]


@pytest.fixture(scope="session")
def trained(tiny_config, h5_path, tmp_path_factory):
    """`python experiments/run.py --probe=random` on the tiny config for 2 epochs, run in this
    process (through `runpy`) so that the model's traces can be counted.

    Returns (config, results, traces, stdout). Tests that continue the run copy its workdir first.
    """
    from phljax.train import loop

    workdir = str(tmp_path_factory.mktemp("trained") / "run")
    argv = cli_args(["--probe=random"], h5_path, workdir)
    counter = {"n": 0}
    make_energy_fn = loop.make_energy_fn  # what `prepare` builds the run's energy function with
    loop.make_energy_fn = lambda model: _counted(make_energy_fn(model), counter)
    old_argv, sys.argv = sys.argv, ["experiments/run.py", *argv]
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            runpy.run_path(os.path.join(REPO, "experiments", "run.py"), run_name="__main__")
    finally:
        loop.make_energy_fn, sys.argv = make_energy_fn, old_argv
    config = phljax.config.parse_args(argv)
    assert config == tiny_config.replace(workdir=workdir)
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    return config, results, counter["n"], stdout.getvalue()


N_PROBES = 2  # probes per call of `model64.derivs` (a fixed number: one compilation)


def model_derivatives(energy_fn, params):
    """Energies, forces, HVPs, the full batch Hessian and its diagonal blocks from one jitted function.

    Returns `derivs(batch, probes=None)`, probes [N_PROBES, N, 3] (default zeros).
    """

    @jax.jit
    def derivs(params, batch, probes):
        def total(r):
            return energy_fn(params, batch._replace(positions=r)).sum()

        _, g, hv = phljax.value_grad_and_hvp(total, batch.positions, probes)
        return {
            "energy": energy_fn(params, batch),  # [G] eV
            "forces": -g,  # [N, 3] eV/A
            "hvp": hv,  # [K, N, 3] eV/A^2
            "hessian": phljax.hessian(total, batch.positions),  # [N, 3, N, 3] eV/A^2
            "blocks": phljax.block_hessian(total, batch.positions, batch.graph_nodes),  # [N, 3, A, 3] eV/A^2
        }

    def call(batch, probes=None):
        if probes is None:
            probes = jnp.zeros((N_PROBES, *batch.positions.shape), batch.positions.dtype)
        assert probes.shape == (N_PROBES, *batch.positions.shape), probes.shape
        return jax.tree.map(np.asarray, derivs(params, batch, probes))

    return call


@pytest.fixture(scope="session")
def model64(molecules):
    """The tiny NequIP in float64 with random parameters, a 3-molecule budget and jitted `derivs`.

    Call `derivs` and build batches inside `jax.enable_x64(True)` (the `x64` fixture).
    """
    with jax.enable_x64(True):
        model = build_model(cutoff=CUTOFF64, **TINY)
        energy_fn = make_energy_fn(model)
        budget = phdata.budget_for(molecules, 3, CUTOFF64, with_hessian=True)

        def batch(mols, indices=None):
            return jax.tree.map(jnp.asarray, phdata.make_batch(mols, budget, CUTOFF64, indices, dtype=np.float64))

        params = init_params(model, batch(molecules[:3]), jax.random.PRNGKey(0))
        params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    return types.SimpleNamespace(
        model=model,
        energy_fn=energy_fn,
        params=params,
        budget=budget,
        batch=batch,
        derivs=model_derivatives(energy_fn, params),
    )
