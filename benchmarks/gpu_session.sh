#!/usr/bin/env bash
# One short GPU session: full-size SDXL UNet timings (stock vs AnyMS, recording), the processor's
# per-call cost at SDXL layer shapes, then the toy world's training. Results land in $OUT.
#   OUT=outputs/gpu TOY_MINUTES=7 bash benchmarks/gpu_session.sh
set -uo pipefail
OUT=${OUT:-outputs/gpu}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
"$PY" -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

"$PY" benchmarks/sdxl_unet.py --device "$DEVICE" --steps "${SDXL_STEPS:-30}" --size "${SDXL_SIZE:-1024}" --json "$OUT/sdxl_unet.json" 2>&1 \
    | grep -v -i warn | tee "$OUT/sdxl_unet.txt"
"$PY" benchmarks/processor_cost.py --device "$DEVICE" --repeats "${REPEATS:-20}" 2>&1 | grep -v -i warn | tee "$OUT/processor_cost.txt"

"$PY" -m anyms_core.toy.train --device "$DEVICE" --minutes "${TOY_MINUTES:-7}" --batch-size "${TOY_BATCH:-512}" --out toy_ckpt \
    > "$OUT/train.log" 2>&1
echo "train exit code $?"
tr '\r' '\n' < "$OUT/train.log" | grep -v "it/s]$\|s/it]$" | tail -n 40
tar czf "$OUT/toy_ckpt.tgz" -C toy_ckpt --exclude checkpoint.pt . && ls -la "$OUT"
