#!/usr/bin/env bash
# One short GPU session: full-size SDXL (random fp16 weights) timings and the processor's per-call cost.
# Each line stays under the 10-minute limit of one device command; run them as separate commands if needed.
#   OUT=outputs/gpu bash benchmarks/gpu_session.sh            # everything (about 12-15 minutes on an H200, untested)
#   OUT=outputs/gpu SECTIONS=unet bash benchmarks/gpu_session.sh
#   OUT=outputs/gpu SECTIONS=toy TOY_MINUTES=8 bash benchmarks/gpu_session.sh   # the toy world's training (--minutes is wall clock, checks included; 8 fits one 10-minute device command)
# Nothing here has run on a GPU yet: `python benchmarks/sdxl_unet.py --tiny --device cpu ...` is the CPU smoke test.
set -uo pipefail
OUT=${OUT:-outputs/gpu}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
SECTIONS=${SECTIONS:-"unet scaling pipeline processor"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
"$PY" -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

for section in $SECTIONS; do
  case $section in
    unet|scaling|pipeline)
      # unet: 6 configurations eager, 4 with torch.compile, 2 with CUDA graphs (each compile ~1-2 min);
      # scaling: subjects 1-10 and 512-1536 px, eager; pipeline: end-to-end seconds per image, stock vs anyms.
      "$PY" benchmarks/sdxl_unet.py --device "$DEVICE" --sections "$section" --rounds "${ROUNDS:-3}" \
          --json "$OUT/sdxl_$section.json" 2>&1 | grep -v -i warn | tee "$OUT/sdxl_$section.txt" ;;
    processor)
      "$PY" benchmarks/processor_cost.py --device "$DEVICE" --repeats "${REPEATS:-20}" 2>&1 | grep -v -i warn \
          | tee "$OUT/processor_cost.txt" ;;
    toy)  # optional (not in the default SECTIONS): the toy world's recipe (the trainer's defaults, docs/toy-world-model-card.md), from scratch
      "$PY" -m anyms_core.toy.train --device "$DEVICE" --minutes "${TOY_MINUTES:-7}" --batch-size "${TOY_BATCH:-512}" \
          --out toy_ckpt > "$OUT/train.log" 2>&1
      echo "train exit code $?"
      tr '\r' '\n' < "$OUT/train.log" | grep -v "it/s]$\|s/it]$" | tail -n 40
      tar czf "$OUT/toy_ckpt.tgz" -C toy_ckpt --exclude checkpoint.pt . && ls -la "$OUT" ;;
  esac
done
