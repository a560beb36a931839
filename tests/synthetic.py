"""A small analytic reference potential for tests: Morse bonds between all atom pairs.

It gives exact energies, forces and Hessians (by jax autodiff in float64) for random distortions
of small C/H/N/O molecules, so tests can train and compare without DFT.
"""

import jax
import jax.numpy as jnp
import numpy as np

from phljax.data import Molecule

EQUILIBRIA = {
    "H2O": ([8, 1, 1], [[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]),
    "NH3": ([7, 1, 1, 1], [[0, 0, 0.1], [0.94, 0, -0.27], [-0.47, 0.81, -0.27], [-0.47, -0.81, -0.27]]),
    "CH4": (
        [6, 1, 1, 1, 1],
        [[0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63], [-0.63, 0.63, -0.63], [0.63, -0.63, -0.63]],
    ),
    "H2CO": ([6, 8, 1, 1], [[0, 0, 0], [1.21, 0, 0], [-0.55, 0.94, 0], [-0.55, -0.94, 0]]),
}


def morse_energy(positions, numbers):
    """Sum of Morse terms over pairs (eV, Angstrom); depth and width depend on the elements."""
    z = jnp.asarray(numbers, positions.dtype)
    d = positions[:, None] - positions[None]
    n = positions.shape[0]
    r = jnp.sqrt(jnp.sum(d**2, -1) + jnp.eye(n))
    r0 = 0.5 + 0.06 * (z[:, None] + z[None]) ** 0.5
    depth = 0.2 + 0.02 * jnp.sqrt(z[:, None] * z[None])
    e = depth * (1 - jnp.exp(-1.8 * (r - r0))) ** 2 - depth
    return 0.5 * jnp.sum(jnp.where(jnp.eye(n, dtype=bool), 0.0, e)) + 0.1 * jnp.sum(z)


def synthetic_molecules(n_per_molecule: int = 8, seed: int = 0, scale: float = 0.08) -> list[Molecule]:
    """Distorted small molecules labelled with the Morse potential (float64 labels)."""
    rng = np.random.default_rng(seed)
    out = []
    with jax.enable_x64(True):
        for name, (numbers, eq) in EQUILIBRIA.items():
            numbers = np.array(numbers)
            eq = np.array(eq, dtype=np.float64)
            e_fn = jax.jit(lambda r, z=tuple(numbers): morse_energy(r, jnp.array(z)))
            g_fn = jax.jit(jax.grad(e_fn))
            h_fn = jax.jit(jax.hessian(e_fn))
            for k in range(n_per_molecule):
                pos = eq + rng.normal(scale=scale, size=eq.shape)
                r = jnp.asarray(pos)
                out.append(
                    Molecule(
                        numbers=numbers,
                        positions=pos,
                        energy=float(e_fn(r)),
                        forces=-np.asarray(g_fn(r)),
                        hessian=np.asarray(h_fn(r)),
                        meta={"name": name, "category": "nms", "index": k},
                    )
                )
    return out
