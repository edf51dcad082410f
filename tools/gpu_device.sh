#!/usr/bin/env bash
# On a GPU machine with PyTorch and transformers but no network: install .bundle/ (tools/gpu_bundle.py),
# then run one stage. Results go to $OUT (the device tool's return folder) or runs/gpu-device.
#   bash tools/gpu_device.sh                 # the first call on a new machine, under 8 minutes: notebooks 01-08
#                                            # under gpu-smoke (4 min cap), then the 8B QLoRA benchmark (3 min cap)
#   bash tools/gpu_device.sh bench-unsloth   # gpu_finetune.py: unsloth-qlora, unsloth-lora    (~6 min on an H100)
#   bash tools/gpu_device.sh bench-plain     # gpu_finetune.py: plain-qlora, plain-lora        (~6 min)
#   bash tools/gpu_device.sh notebooks       # notebooks 01-08 under profile gpu-smoke (Unsloth, 4-bit)
#   bash tools/gpu_device.sh all             # the three in turn (longer than one device call allows)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu-device}
mkdir -p "$out"
[ -d .bundle/wheels ] || { echo "no .bundle/: run python tools/gpu_bundle.py first (on a machine with PyPI)"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .bundle/wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers, unsloth; print('torch', torch.__version__, 'transformers', transformers.__version__, 'unsloth', unsloth.__version__)"

bench() {
  python3 benchmarks/gpu_finetune.py --variants "$@" --tokenizer .bundle/tokenizer --json "$out/bench-$1.json" \
    2> >(tail -c 20000 > "$out/bench-$1.stderr.txt") | tee "$out/bench-$1.txt"
}
notebooks() {
  python3 -m tools.llama_shapes tiny .cache/gpu-smoke-llama --tokenizer .bundle/tokenizer --device cuda
  # 08 serves with llama.cpp's CPU wheel (xllamacpp, 34 MB), which the bundle carries only when it fits
  LLM_SCHOOL_RUNS=/tmp/runs timeout "${NOTEBOOKS_SECONDS:-900}" python3 -m helpers.runner --profile gpu-smoke \
    --run-name gpu-smoke --only 01 02 03 04 05 06 07 08 2>&1 | tee "$out/notebooks.txt" || echo "notebooks: stopped"
  tar -czf "$out/gpu-smoke-run.tar.gz" -C /tmp/runs gpu-smoke || true
}
first_call() {  # one device call: every stage capped so the whole stays under 8 minutes
  NOTEBOOKS_SECONDS=240 notebooks
  timeout 180 bash -c "$(declare -f bench); out=$out; bench unsloth-qlora" || echo "bench: stopped at its cap"
}

case ${1:-first-call} in
  first-call) first_call ;;
  bench-unsloth) bench unsloth-qlora unsloth-lora ;;
  bench-plain) bench plain-qlora plain-lora ;;
  notebooks) notebooks ;;
  all) bench unsloth-qlora unsloth-lora; bench plain-qlora plain-lora; notebooks ;;
  *) echo "usage: $0 [first-call]|bench-unsloth|bench-plain|notebooks|all"; exit 2 ;;
esac
