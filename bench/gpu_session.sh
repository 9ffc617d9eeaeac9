#!/usr/bin/env bash
# The checks and timings a CPU cannot make, prepared for a short loan of one CUDA GPU (15 minutes of
# device time in all, starts included, at most 10 minutes a command), one command per stage:
#
#   make gpu-carry                        # here, once: .gpu_carry/ (wheels the GPU image lacks, a tokenizer)
#   bash bench/gpu_session.sh indexing    # there (limit 400 s): the >= 8x indexing target at Llama-3.1-8B shapes
#   bash bench/gpu_session.sh kernels     # there (limit 420 s): the kernel tests in bf16, bench.lora, bench.losses
#   bash bench/gpu_session.sh memory      # there, if time is left (limit 390 s): the paper preset's training
#                                         #   step at 8B shapes by --micro-batch-tokens (bench.train_memory),
#                                         #   and one MoE layer's experts LoRA (bench.lora_experts)
#   bash bench/gpu_session.sh tests       # there, if time is left: the rest of the suite (-m "not slow")
#
# with .gpu_carry carried along, and a call's own time limit the stage's plus ~60 s (the wheels'
# install and the environment lines); `indexing` first, as its target is the one still pending.
# Stages run in the order given. Each step runs under its own time limit, so a hang costs that
# step, not the loan. Results go to $OUT (the device tool's folder) or runs/gpu_session:
# summary.txt (a line a step: exit code and seconds), session.log (every step's output) and each
# bench's markdown table, to commit under bench/results/ with the device's name.
#
# The GPU image has torch, triton, transformers and peft of its own; the wheels add what it lacks (gguf,
# datasets and its two helpers, liger-kernel for bench.losses' comparison rows). Nothing can be fetched
# there and the bundled SmolLM2 (a 270 MB GGUF) is too big to carry, so the tests that load it fail
# there, and the slow end-to-end one is left out.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu_session}
carry=${GPU_CARRY:-.gpu_carry}
py=${PYTHON:-python3}
work=${GPU_WORK:-/tmp/kmkernels_gpu}  # 16 GB of random 8B weights and the teacher caches: not under $OUT
shape=${GPU_SHAPE:-llama-3.1-8b}      # `tiny` runs the indexing stage on a CPU in a few minutes (a dry run)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

if [ $# -eq 0 ]; then
  echo "usage: bash bench/gpu_session.sh indexing|kernels|memory|tests ..." >&2
  exit 2
fi
for stage in "$@"; do
  case $stage in indexing|kernels|memory|tests) ;; *) echo "bench/gpu_session.sh: unknown stage '$stage' (indexing, kernels, memory, tests)" >&2; exit 2;; esac
done
if [[ " $* " == *" indexing "* || " $* " == *" memory "* ]] && [ ! -f "$carry/tokenizer/tokenizer.json" ]; then
  echo "bench/gpu_session.sh: no $carry/tokenizer: run 'make gpu-carry' here and carry $carry along" >&2
  exit 2
fi
mkdir -p "$out" "$work"

step() {  # step NAME LIMIT_S COMMAND...: COMMAND under a time limit, its output appended to session.log
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS rc
  echo "=== $name (limit ${limit} s): $*" >> "$out/session.log"
  timeout --kill-after=10 "$limit" "$@" >> "$out/session.log" 2>&1
  rc=$?
  [ $rc -eq 124 ] && echo "=== $name: stopped at its limit of $limit s" >> "$out/session.log"
  printf '%-16s exit %-4s %5d s\n' "$name" "$rc" $((SECONDS - t0)) | tee -a "$out/summary.txt"
}

if compgen -G "$carry/wheels/*.whl" > /dev/null; then
  step wheels 120 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$work/site" "$carry"/wheels/*.whl
  export PYTHONPATH=$PYTHONPATH:$work/site  # it holds only what the image lacks, so it shadows nothing
fi
step environment 60 sh -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1;
  $py -c 'import torch, triton, transformers, peft; print(\"torch\", torch.__version__, \"triton\", triton.__version__,
  \"transformers\", transformers.__version__, \"peft\", peft.__version__, \"cuda\", torch.cuda.is_available())'"

kernel_tests="tests/test_fused_linear_kl.py tests/test_kl_from_stats.py tests/test_hidden_l1.py tests/test_dcd.py
  tests/test_lora.py tests/test_utils.py"
for stage in "$@"; do
  case $stage in
  indexing)
    # The issue's reference recipe reads 2k-token chunks: 4 documents of 8 demo documents each
    # (~2,100 tokens), the full recipe against --no-teacher-cache --docs-per-step 1 --backend torch,
    # side by side at the default 60 steps, each in a fresh process (bench.indexing's docstring).
    step indexing 400 "$py" -m bench.indexing --random-shape "$shape" --tokenizer "$carry/tokenizer" --long 8 \
      --work "$work/indexing" --out "$out/indexing_${shape}_long8.md" ;;
  kernels)
    # what a GPU checks that the CPU's Triton interpreter cannot (bf16 loads), then the timings
    # shellcheck disable=SC2086
    step kernel-tests 120 "$py" -m pytest -q -p no:cacheprovider $kernel_tests
    step bench-lora 120 "$py" -m bench.lora --out "$out/lora_gpu.md"
    step bench-losses 180 "$py" -m bench.losses --out "$out/losses_gpu.md" ;;
  memory)
    # the paper preset's step (8 documents x 8 examples of 768 tokens) in one pass and in passes of the
    # preset's 4096 and of 8192 tokens: peak memory and step time; the random weights of `indexing` are reused
    step train-memory 300 "$py" -m bench.train_memory --random-shape "$shape" --tokenizer "$carry/tokenizer" \
      --work "$work" --micro 0 4096 8192 --out "$out/train_memory_${shape}.md"
    # one MoE layer at Qwen3-30B-A3B's expert shapes, 8 documents: the experts' LoRA in training with each
    # slot's W + delta made again in the backward (the default) and kept
    step lora-experts 90 "$py" -m bench.lora_experts --experts 128 --hidden 2048 --intermediate 768 --top-k 8 \
      --docs 8 --tokens 512 --out "$out/lora_experts_gpu.md" ;;
  tests)
    # shellcheck disable=SC2046
    step other-tests 240 "$py" -m pytest -q -p no:cacheprovider -m "not slow" tests $(printf -- '--ignore=%s ' $kernel_tests) ;;
  esac
done
echo "summary ($out/summary.txt):"
cat "$out/summary.txt"
