"""phljax: Projected Hessian Learning for E(3)-equivariant interatomic potentials in JAX."""
