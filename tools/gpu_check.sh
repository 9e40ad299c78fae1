#!/usr/bin/env bash
# FVQ-Rater GPU check: run `bash tools/gpu_check.sh` from the repository root on a host with one
# NVIDIA H100/H200 and a Python that has torch, transformers 5, peft, accelerate and safetensors
# (no pip, no network, no video/face/pyiqa/lmms-eval libraries needed: only the model path is imported).
#
# It prints one report and writes it as JSON to $OUT/gpu_check.json ($OUT set) or ./gpu_check.json:
#   - python/torch/transformers/peft/accelerate/safetensors versions, GPU name and memory, CUDA/cuDNN,
#     which SDPA backends are enabled and whether the flash_attn package is installed;
#   - for random FVQ-Rater models at InternVL2-1B and InternVL2-8B shapes, in bf16:
#       prefill throughput (videos/s) and peak GPU memory at batch 1 and 8 (fvq_plugin.bench.bench_model),
#       save_pretrained to a temporary folder (~2 GB for 1B, ~16 GB for 8B; --tmp DIR or $FVQ_GPU_CHECK_TMP
#       to put it elsewhere; removed afterwards) and the time of
#       FVQRater.from_pretrained(dir, dtype=torch.bfloat16, device_map="cuda", attn_implementation="sdpa"),
#       the attention implementation configured and the SDPA kernels a forward actually ran (flash or not),
#       the same 8 random videos scored as one batch of 8 and as 8 batches of 1: max |score difference|
#       on the 0-100 scale, PASS/FAIL against 0.5 points (the reason is printed);
#   - a summary table and a final line `VERDICT: PASS|FAIL|INCOMPLETE` (exit status 0, 1 on FAIL, 124 if the
#     8-minute limit below stopped it).
# Expected runtime: about 3-5 minutes on one H100/H200 (InternVL2-1B well under a minute; 8B writing and
# loading its 16 GB checkpoint takes most of the rest). A budget inside the check (--budget-s, default
# 420 s) skips any step that would not finish in time, with a SKIP line; this script stops it at 8
# minutes at the latest (SIGINT, so it still summarises and cleans up). The JSON is rewritten after every step.
# Options are passed through, e.g. `bash tools/gpu_check.sh --sizes internvl2-1b` or `--smoke` (tiny, CPU, seconds).
set -euo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false FVQ_PLUGIN_DISCOVERY=0
# The first of $PYTHON, python, python3 that has torch.
for candidate in ${PYTHON:-} python python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c \
        "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)" 2>/dev/null; then
        PYTHON="$candidate"
        break
    fi
    PYTHON=""
done
if [ -z "$PYTHON" ]; then
    echo "gpu_check.sh: no python with torch found (set PYTHON=/path/to/python)" >&2
    exit 2
fi

if command -v timeout >/dev/null 2>&1; then
    exec timeout --signal=INT --kill-after=30 "${GPU_CHECK_LIMIT_S:-480}" "$PYTHON" tools/gpu_check.py "$@"
fi
exec "$PYTHON" tools/gpu_check.py "$@"
