"""r1jax.trainers."""
