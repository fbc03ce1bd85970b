"""r1jax.kernels: fused kernels and their XLA twins, one switch (`loss.impl`) to pick."""

from r1jax.kernels.logprob import (IMPLS, TokenTerms, grpo_token_terms, impl_from_config,
                                   resolve_impl, token_logprobs_and_clip)

__all__ = ["IMPLS", "TokenTerms", "grpo_token_terms", "impl_from_config", "resolve_impl",
           "token_logprobs_and_clip"]
