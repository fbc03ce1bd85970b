"""r1jax.checkpoint."""
