"""Distillation (design.md §1, the R1 paper's distilled students): SFT of a
smaller dense student on the teacher's rejection-sampled outputs
(sequence-level, the paper's method), or token-level KD to the teacher's
next-token distributions as an option.

  python -m r1jax.main --config=configs/distill.py:tiny --workdir=/tmp/distill \
      --config.teacher_workdir=/tmp/r1 [--config.distill.method=token]

`teacher_workdir` is a configs/r1.py run: its stage-3 dataset
(rejection_sft/data/data.jsonl, rejection.write_dataset's format: one
{"prompt", "completion", "kind", "source"} object per line) is what the
student learns from, and its final stage's params are the teacher of the
token-level option. `data_file` names such a jsonl directly instead. The
tiny-world student (model preset `tiny-student`: 2 layers instead of 4) is
pretrained into WORKDIR/student_base with the teacher's tokenizer unless
`student_base_workdir` names one. `smoke` shrinks everything to seconds.

The real presets are the paper's six students with its distillation
settings (DeepSeek-R1, Nature 2025 supplementary, as we read it: ~800k
samples, 2 epochs, batch 64, 32k context, cosine decay to a tenth, peak lr
per student below). Running them needs a converted Hugging Face checkpoint
(`student_base_workdir`, r1jax.checkpoint.hf) and the teacher's samples
(`data_file`); they build and pass `jax.eval_shape` in the tests.
"""

import dataclasses

import ml_collections

from r1jax.config_files import sibling_config
from r1jax.models.build import get_preset

TINY_PRESETS = ("tiny", "smoke")
# Student -> peak learning rate of its distillation SFT.
REAL_PRESETS = {
    "qwen2.5-math-1.5b": 1e-4,
    "qwen2.5-math-7b": 8e-5,
    "qwen2.5-14b": 7e-5,
    "qwen2.5-32b": 6e-5,
    "llama3.1-8b": 5e-5,
    "llama3.3-70b": 2e-5,
}


def _real_config(name: str) -> ml_collections.ConfigDict:
  c = get_config("tiny")
  c.name = f"distill-{name}"
  del c["pretrain"]
  c.student_base_workdir = ""  # required: the converted Hugging Face base
  c.data_file = ""  # required: the teacher's samples (prompt/completion jsonl)
  c.model = dataclasses.asdict(get_preset(name))
  c.model.max_position_embeddings = 32768
  c.teacher_model = {}  # token-level KD only: the teacher's ModelConfig fields
  c.sft.update(num_epochs=2, num_steps=0, batch_size=64, seq_len=32768)
  c.optim.update(learning_rate=REAL_PRESETS[name], warmup_steps=100, final_lr_fraction=0.1,
                 weight_decay=0.0)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.train.checkpoint_every = 500
  c.eval.max_new_tokens = 32768
  return c


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  if arg in REAL_PRESETS:
    return _real_config(arg)
  if arg not in TINY_PRESETS:
    raise ValueError(f"configs/distill.py knows presets {TINY_PRESETS} and "
                     f"{tuple(REAL_PRESETS)}, not {arg!r}")
  smoke = arg == "smoke"
  c = ml_collections.ConfigDict()
  c.name = f"distill-{arg}"
  c.stage = "distill"
  c.seed = 0

  c.teacher_workdir = ""  # a configs/r1.py WORKDIR (its stage-3 data; its params for token KD)
  c.teacher_stage = "all_scenario_rl"  # the teacher's params for token KD: this stage's checkpoint
  c.data_file = ""  # "" = TEACHER/rejection_sft/data/data.jsonl
  c.student_base_workdir = ""  # "" = pretrain the student into WORKDIR/student_base
  c.pretrain = sibling_config(__file__, "pretrain", "smoke" if smoke else "tiny-student")
  c.pretrain.seed = c.get_ref("seed")
  if smoke:
    c.pretrain.train.num_steps = 10
    c.pretrain.train.checkpoint_every = 10
    c.pretrain.data.batch_size = 8
    c.pretrain.eval.num_problems = 8
  c.model = c.pretrain.model.to_dict()  # the student
  teacher = sibling_config(__file__, "r1", arg)
  # The student's base reads the teacher's base's corpus.
  c.pretrain.data.question_language_fraction = teacher.pretrain.data.question_language_fraction
  c.teacher_model = teacher.model.to_dict()  # token-level KD: the teacher's architecture

  c.distill = ml_collections.ConfigDict()
  c.distill.method = "sequence"  # sequence (SFT on the teacher's samples, R1) | token (KD)
  c.distill.temperature = 1.0  # token KD: softmax temperature of both distributions
  c.distill.direction = "forward"  # token KD: forward KL(teacher||student) | reverse
  c.distill.kd_weight = 0.5  # token KD: loss = w KD + (1 - w) cross-entropy on the samples

  c.sft = ml_collections.ConfigDict()
  c.sft.num_epochs = 0  # > 0: steps = epochs x packed rows / batch_size (replaces num_steps)
  c.sft.num_steps = 3 if smoke else 200
  c.sft.batch_size = 4 if smoke else 16  # packed rows per step
  c.sft.seq_len = 256

  c.loss = ml_collections.ConfigDict()
  c.loss.impl = "auto"

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-3  # peak
  c.optim.warmup_steps = 1 if smoke else 10
  c.optim.final_lr_fraction = 0.1
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.clip_grad_norm = 1.0

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = c.sft.get_ref("num_steps")  # set from num_epochs at run time when > 0
  c.train.log_every = 10
  c.train.checkpoint_every = 100
  c.train.keep_checkpoints = 2
  c.train.max_consecutive_nonfinite = 5
  c.train.progress_bar = True

  c.mesh = c.pretrain.mesh.copy_and_resolve_references()
  c.eval = teacher.eval.copy_and_resolve_references()  # the teacher's held-out evaluation
  return c
