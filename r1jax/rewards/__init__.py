"""r1jax.rewards: rule-based rewards `(prompt, completion, reference) -> float` and their runner."""

from r1jax.rewards.accuracy import accuracy_reward, accuracy_reward_fn, extract_answer, is_equivalent
from r1jax.rewards.code import CodeVerifier, code_reward, code_reward_binary_fn, code_reward_fn, extract_code
from r1jax.rewards.format import format_reward, format_reward_fn, tag_count_reward, tag_count_reward_fn
from r1jax.rewards.language import (infer_language, language_consistency_reward,
                                    language_consistency_reward_fn)
from r1jax.rewards.length import overlong_penalty
from r1jax.rewards.runner import RewardRunner
