#!/usr/bin/env bash
# On a GPU machine with PyTorch and transformers but no network: install .bundle/ (tools/gpu_bundle.py),
# then run one stage. Results go to $OUT (the device tool's return folder) or runs/gpu-device.
#   bash tools/gpu_device.sh bench-unsloth   # gpu_finetune.py: unsloth-qlora, unsloth-lora    (~6 min on an H100)
#   bash tools/gpu_device.sh bench-plain     # gpu_finetune.py: plain-qlora, plain-lora        (~6 min)
#   bash tools/gpu_device.sh notebooks       # notebooks 01-06 under profile gpu-smoke (Unsloth, 4-bit)
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
  LLM_SCHOOL_RUNS=/tmp/runs python3 -m helpers.runner --profile gpu-smoke --run-name gpu-smoke --only 01 02 03 04 05 06 \
    2>&1 | tee "$out/notebooks.txt"
  tar -czf "$out/gpu-smoke-run.tar.gz" -C /tmp/runs gpu-smoke
}

case ${1:-} in
  bench-unsloth) bench unsloth-qlora unsloth-lora ;;
  bench-plain) bench plain-qlora plain-lora ;;
  notebooks) notebooks ;;
  all) bench unsloth-qlora unsloth-lora; bench plain-qlora plain-lora; notebooks ;;
  *) echo "usage: $0 bench-unsloth|bench-plain|notebooks|all"; exit 2 ;;
esac
