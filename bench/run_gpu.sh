#!/usr/bin/env bash
# Every GPU figure the issues ask for, in one run (for a session that is lent a device machine, whose
# plain `python3` holds a CUDA PyTorch; numpy, safetensors and tqdm are there too). Each benchmark prints
# its own figures; copy them into bench/RESULTS.md with this command line. Logs go to $OUT when set.
#   device run:  bash bench/run_gpu.sh          (about 5-8 minutes on one H100/H200)
# precision.py reads the parity fixtures; ../shared does not travel to the device machine, so copy
# ../shared/golden to shared/golden (git-ignored) first, or set GOLDEN.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python3}"
LOG="${OUT:-/tmp}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
"$PY" bench/sparse_conv.py --device cuda 2>&1 | tee "$LOG/sparse_conv.txt"
"$PY" bench/registration.py --device cuda 2>&1 | tee "$LOG/registration.txt"
"$PY" bench/registration.py --device cuda --textured --input-vertices 100000 2>&1 | tee -a "$LOG/registration.txt"
"$PY" bench/precision.py --device cuda --golden "${GOLDEN:-shared/golden}" 2>&1 | tee "$LOG/precision.txt"
"$PY" bench/matting.py speed --device cuda --frames 32 --batch 4 --repeats 3 2>&1 | tee "$LOG/matting.txt"
"$PY" bench/matting.py precision --device cuda --golden "${GOLDEN:-shared/golden}" 2>&1 | tee -a "$LOG/matting.txt"
"$PY" bench/pipeline.py --device cuda --precision fp16 --frames 32 --voxels 20000 2>&1 | tee "$LOG/pipeline.txt"
"$PY" bench/pipeline.py --device cuda --precision fp16 --frames 32 --voxels 20000 --no-offload 2>&1 \
  | tee "$LOG/pipeline_no_offload.txt"
"$PY" bench/rig.py --device cuda 2>&1 | tee "$LOG/rig.txt"
"$PY" bench/long_clip.py pipeline --device cuda 2>&1 | tee "$LOG/long_clip.txt"
