#!/usr/bin/env bash
# The benchmarks on an accelerator machine, logs under ${OUT:-/tmp/bench_out}.
#
#   bash benchmarks/accelerator.sh [all]   # both of:
#   bash benchmarks/accelerator.sh mfu     # MFU of the 1.5B GRPO update, cuDNN / XLA attention
#   bash benchmarks/accelerator.sh rest    # sampler, bench/tiny GRPO steps, roofline, 1.5B step
#
# Run from the repository root where jax for the accelerator is installed;
# wheels in .whl/ (pure-Python packages the machine lacks: ml_collections,
# math-verify and its parsers) are installed first. On an H100 (README,
# Performance) `mfu` took 162 s and `rest`'s 1.5B step ~250 s (3 min of it
# measuring matmul rates; its phase lines go to stderr as each ends).
set -uo pipefail
OUT=${OUT:-/tmp/bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="$PWD:/tmp/site"
else
  export PYTHONPATH="$PWD"
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
cd benchmarks
mfu() {
  python3 mfu.py --variants attention=cudnn attention=xla 2>&1 | tee "$OUT/mfu.log"
}
rest() {
  python3 sampler.py 2>&1 | tee "$OUT/sampler.log"
  python3 grpo_step.py --presets bench tiny 2>&1 | tee "$OUT/grpo_step.log"
  python3 roofline.py 2>&1 | tee "$OUT/roofline.log"
  python3 grpo_step.py --presets qwen2.5-math-1.5b --mid-layers 28 --dtype bfloat16 \
    --shape 4 8 128 255 --micro-batches 2 --attention cudnn --steps 3 2>&1 \
    | tee "$OUT/grpo_step_1p5b.log"
}
case "${1:-all}" in
  mfu) mfu ;;
  rest) rest ;;
  all) mfu; rest ;;
  *) echo "usage: $0 [mfu|rest|all]" >&2; exit 2 ;;
esac
