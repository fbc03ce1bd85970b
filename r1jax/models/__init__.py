"""r1jax.models."""
