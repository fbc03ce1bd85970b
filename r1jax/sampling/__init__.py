"""r1jax.sampling."""
