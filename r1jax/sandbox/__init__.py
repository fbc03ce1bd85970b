"""r1jax.sandbox: run untrusted programs with limits and whatever isolation the machine allows."""

from r1jax.sandbox.runner import Isolation, Limits, RunResult, Sandbox, probe, run_python
