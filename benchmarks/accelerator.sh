#!/usr/bin/env bash
# The accelerator figures in one run: the card, the MLP for every rule with 1, 4 and 16
# vmapped seeds (benchmarks/throughput.py, with a plain PyTorch loop on the same device
# when torch is there), and LeNet-5 for every rule (benchmarks/lenet.py). Each part's
# output goes to OUTDIR (default $OUT, else runs/accelerator) as well as to the screen.
#
#   benchmarks/accelerator.sh [OUTDIR]
#
# It runs from the repository root with no install step: bioflax comes from the checkout
# (PYTHONPATH), and the packages a machine lacks can travel as wheels in .whl/, which are
# installed first into /tmp/site. The project's accelerator machines have jax, flax, optax
# and orbax but neither clu nor ml_collections; fetch those, at requirements.txt's pins, with
#   grep -E '^(clu|ml-collections)==' requirements.txt \
#     | xargs python3 -m pip download --no-deps --only-binary=:all: -d .whl
# PYTHON (default python3) is the interpreter; REPEATS (3) the epochs or rounds per figure,
# LENET_STEPS (100) the steps per LeNet figure.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-runs/accelerator}}
python=${PYTHON:-python3}
repeats=${REPEATS:-3}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 \
    || echo "nvidia-smi: not available"
  "$python" -c 'import jax; print("jax", jax.__version__, jax.devices())'
} | tee "$out/device.txt"
"$python" benchmarks/throughput.py --quick --repeats "$repeats" --seeds 1,4,16 2>&1 \
  | tee "$out/mlp.txt"
"$python" benchmarks/lenet.py --steps "${LENET_STEPS:-100}" --repeats "$repeats" 2>&1 \
  | tee "$out/lenet.txt"
