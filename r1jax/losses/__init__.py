"""r1jax.losses."""
