"""DeepSeek-R1's four stages in the tiny world, from an R1-Zero run:
cold start -> reasoning RL -> rejection-sampling SFT -> all-scenario RL.

  python -m r1jax.main --config=configs/r1.py:tiny --workdir=/tmp/r1 \
      [--config.r1_zero_workdir=/tmp/r1zero] [--config.stages=cold_start,reasoning_rl]

Without `r1_zero_workdir` the R1-Zero run (and its base) goes into
WORKDIR/r1_zero first (configs/r1_zero.py of the same preset: every section
of that config is here too and means the same). `smoke` shrinks everything
to seconds (used by the tests). See r1jax/stages/r1.py for what each stage
writes.
"""


import ml_collections

from r1jax.config_files import sibling_config

PRESETS = ("tiny", "smoke")
STAGES = "cold_start,reasoning_rl,rejection_sft,all_scenario_rl"
QUESTION_LANGUAGE_FRACTION = 0.5


def _sft(smoke: bool, steps: int, lr: float) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      num_steps=3 if smoke else steps,  # optimizer steps
      batch_size=4 if smoke else 16,  # packed rows per step
      seq_len=256,  # tokens per packed row (prompt + completion ~150)
      optim=dict(learning_rate=lr, warmup_steps=1 if smoke else 10)))


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  if arg not in PRESETS:
    raise ValueError(f"configs/r1.py knows presets {PRESETS}, not {arg!r}")
  smoke = arg == "smoke"
  c = sibling_config(__file__, "r1_zero", arg)  # model, base, eval, GRPO, optimizer: as R1-Zero's
  c.name = f"r1-{arg}"
  c.stage = "r1"
  c.r1_zero_workdir = ""  # a finished configs/r1_zero.py run; "" = run it into WORKDIR/r1_zero
  c.stages = STAGES  # comma-separated, in order; a finished stage (results.json) is reused
  # The base (and R1-Zero from it) see answers in the question's language in
  # half their corpus: at 0 the question's language carries no signal a tiny
  # model picks up from a few thousand cold-start examples (measured: 150 SFT
  # steps left the first reasoning word at NLL 0.3-1.4 on its own training
  # examples, and held-out language consistency at 0.63).
  c.pretrain.data.question_language_fraction = QUESTION_LANGUAGE_FRACTION

  # Stage 1: R1-Zero samples on train problems, kept when correct and rewritable
  # in the question's language (tiny_world_r1.readable), SFT of the base on them.
  c.cold_start = ml_collections.ConfigDict()
  c.cold_start.num_problems = 4 if smoke else 2048  # train problems sampled
  c.cold_start.num_samples = 2  # R1-Zero samples per problem
  c.cold_start.temperature = 1.0
  c.cold_start.max_per_problem = 2  # readable examples kept per problem
  c.cold_start.max_examples = 8 if smoke else 2000  # "a few thousand" in the paper
  # Fewer usable samples than this: reference solutions fill up (counted in
  # data/stats.json). Only the smoke preset's untrained policy needs it.
  c.cold_start.min_examples = 4 if smoke else 0
  # lr 3e-4, not pretraining's 1e-3: measured on seed 0's cold-start data
  # (1,371 examples), 150 steps at 1e-3 memorise them (loss 0.02) and fall to
  # greedy accuracy 0.59 on 128 held-out problems, under R1-Zero's 0.86; at
  # 3e-4 the same SFT reaches 0.94.
  c.cold_start.sft = _sft(smoke, 150, 3e-4)

  # Stage 2: R1-Zero's GRPO (c.grpo) from the cold start, plus language consistency.
  c.reasoning_rl = ml_collections.ConfigDict()
  c.reasoning_rl.num_steps = c.grpo.num_steps  # same RL budget as R1-Zero: comparable
  # reward += weight * share of CoT words in the question's language (the
  # paper sums the two: weight 1)
  c.reasoning_rl.language_weight = 1.0
  # Peak lr of stage 2 (GRPO from an SFT-ed policy); 0 = optim.learning_rate
  # (R1-Zero's 2e-4). A tenth of R1-Zero's: seed 1's stage 2 falls 0.882 ->
  # 0.734 held-out pass@1 at 2e-4; at 2e-5 the two-seed table's stage 2 ends
  # at 0.959 / 0.942 from cold starts at 0.907 / 0.882
  # (experiments/r1_tiny/README.md).
  c.reasoning_rl.learning_rate = 2e-5

  # Stage 3: samples of stage 2, filtered (r1jax/data/rejection.py), plus
  # non-reasoning data (translation), SFT of the *base* on the mix.
  c.rejection = ml_collections.ConfigDict()
  c.rejection.num_problems = 4 if smoke else 768
  c.rejection.num_samples = 2 if smoke else 4
  c.rejection.temperature = 1.0
  c.rejection.filters = dict(require_correct=True, min_language_consistency=0.95,
                             max_paragraph_words=200, drop_code_blocks=True, dedupe=True,
                             max_per_prompt=4)
  c.rejection.non_reasoning_fraction = 0.25  # non-reasoning examples per kept reasoning example
  c.rejection.min_examples = 4 if smoke else 0  # as cold_start.min_examples
  c.rejection.sft = _sft(smoke, 200, 3e-4)  # lr: as the cold start's

  # Stage 4: a helpfulness reward model (Bradley-Terry on summary pairs), then
  # GRPO with rule rewards + its score of each completion's summary.
  c.all_scenario = ml_collections.ConfigDict()
  c.all_scenario.num_pairs = 16 if smoke else 512  # training preference pairs
  c.all_scenario.num_heldout_pairs = 8 if smoke else 200
  c.all_scenario.rm_steps = 3 if smoke else 60
  c.all_scenario.rm = dict(batch_size=4 if smoke else 16, max_length=160, margin=0.0)
  c.all_scenario.rm_optim = dict(learning_rate=1e-3, warmup_steps=1 if smoke else 5,
                                 weight_decay=0.0)
  c.all_scenario.num_steps = 3 if smoke else 20  # GRPO steps
  c.all_scenario.learning_rate = 2e-5  # peak lr; 0 = optim.learning_rate; as reasoning_rl's
  c.all_scenario.helpfulness_weight = 0.5  # reward += weight * reward-model score
  return c
