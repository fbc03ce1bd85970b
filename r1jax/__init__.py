"""r1jax: the DeepSeek-R1 post-training recipe in JAX."""

__version__ = "0.1.0"
