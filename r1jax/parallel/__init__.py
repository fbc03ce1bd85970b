"""r1jax.parallel."""
