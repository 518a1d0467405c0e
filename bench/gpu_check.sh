#!/usr/bin/env bash
# What we run on a lent GPU machine, in one go (bench/RESULTS.md records the outcome):
#   1. the tests that exercise GPU paths (resume, CUDA graphs, the batching engine, generation, parity with
#      transformers), with GPT2KIT_TEST_GPU=1 so that the suite does not hide the GPU,
#   2. finetune on the GPU: bf16, --compile, and under torchrun (1 process: one GPU here, so no NCCL group),
#   3. bench/bench_gpu.py: parity, decoding and training speed against transformers (tables last),
#   4. issue 18 on CUDA: sampled decoding's cost over greedy (124M at batch 1 and 8, the small 3 x 96 model at
#      batch 32) beside transformers' sampled generate(); SAMPLING=0 skips it.
#
#   bash bench/gpu_check.sh OUTDIR [bench_gpu.py arguments...]
#
# Needs ../shared/data beside the repository (or a copy in .gpu/shared/data, which is linked there).
set -u
OUT=${1:-/tmp/gpu-check}
shift || true
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
[ -d ../shared/data ] || { [ -d .gpu/shared/data ] && ln -sfn "$PWD/.gpu/shared" ../shared; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__)"; } 2>&1 | tee "$OUT/env.txt"

SECONDS=0
echo "== GPU tests"
# GPT2KIT_TEST_GPU=1: the suite hides GPUs otherwise (tests/conftest.py)
GPT2KIT_TEST_GPU=1 $PY -m pytest -o addopts="" -q -p no:cacheprovider tests/test_gpu.py tests/test_cuda_graphs.py \
    tests/test_server_engine.py tests/test_generate.py tests/test_model_parity.py "tests/test_sampling.py::test_sampling_a_batch_on_cuda_synchronises_the_host_the_same_number_of_times_for_any_batch" \
    >"$OUT/tests_gpu.txt" 2>&1
tail -n 3 "$OUT/tests_gpu.txt"; grep -E "^(FAILED|ERROR)" "$OUT/tests_gpu.txt" | head -20

echo "($SECONDS s)"; echo "== finetune on the GPU, then under torchrun"
W=$(mktemp -d)
$PY - "$W/tiny" <<'EOF'
import sys
from pathlib import Path
import torch
from gpt2kit.checkpoints import save_model
from gpt2kit.config import GPTConfig
from gpt2kit.model import GPT
from gpt2kit.tokenizer import Tokenizer
torch.manual_seed(0)
save_model(GPT(GPTConfig.from_name("tiny")), Tokenizer.from_dir(Path("../shared/data/gpt2-vocab")), sys.argv[1])
EOF
DATA=../shared/data/datasets/tinyshakespeare.txt
ARGS="--model $W/tiny --data $DATA --steps 30 --batch-size 8 --block-size 64 --eval-every 10 --sample-every 15 --no-progress"
$PY -m gpt2kit finetune $ARGS --out "$W/one" --dtype bfloat16 >"$OUT/finetune_one.txt" 2>&1
echo "one process (bf16): exit $?"; tail -n 2 "$OUT/finetune_one.txt"
$PY -m gpt2kit finetune $ARGS --out "$W/compiled" --compile >"$OUT/finetune_compile.txt" 2>&1
echo "one process (--compile): exit $?"; tail -n 2 "$OUT/finetune_compile.txt"
$PY -m torch.distributed.run --standalone --nproc_per_node 1 -m gpt2kit finetune $ARGS --out "$W/ddp" \
    >"$OUT/finetune_nccl.txt" 2>&1
echo "torchrun (1 process): exit $?"; tail -n 2 "$OUT/finetune_nccl.txt"
$PY -m gpt2kit generate "Hello" --model "$W/one" --length 20 --seed 1 >"$OUT/generate.txt" 2>&1
echo "generate from the GPU run: exit $?"

echo "($SECONDS s)"; echo "== bench_gpu.py"
timeout -s TERM "${BENCH_TIMEOUT:-400}" $PY bench/bench_gpu.py --json "$OUT/bench.json" "$@" 2>"$OUT/bench_stderr.txt" | tee "$OUT/bench.txt"
echo "($SECONDS s)"

if [ "${SAMPLING:-1}" != 0 ]; then
  echo "== sampled decoding on CUDA (issue 18)"
  MODES=greedy,top-k,top-p,min-p
  timeout -s TERM "${SAMPLING_TIMEOUT:-240}" $PY bench/bench_gpu.py --only decode --configs gpt2 --batches 1,8 \
      --modes $MODES --new 128 --reps 3 --json "$OUT/sampling_124M.json" 2>"$OUT/sampling_stderr.txt" \
      | tee "$OUT/sampling_124M.txt" | sed -n '/^=====/,$p'
  timeout -s TERM "${SAMPLING_TIMEOUT:-240}" $PY bench/bench_gpu.py --only decode --configs small --batches 32 \
      --decode-dtypes float32 --modes $MODES --new 128 --reps 3 --json "$OUT/sampling_small.json" \
      2>>"$OUT/sampling_stderr.txt" | tee "$OUT/sampling_small.txt" | sed -n '/^=====/,$p'
  echo "($SECONDS s)"
fi
