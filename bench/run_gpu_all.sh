#!/usr/bin/env bash
# Runs the pack's benchmarks at real sizes on a CUDA machine (random weights of the real model sizes).
#   bash bench/run_gpu_all.sh [part]   part: 1 = predictor, jointnet, diff2in1, mesh, half-precision tests;
#                                            2 = tiled sampling + tiled decode;
#                                            3 = the nodes in ComfyUI (needs COMFYUI_DIR): per node first and
#                                                second (cached) run time and peak VRAM; all (default) = every part
# Logs go to ${OUT:-/tmp}/log_<part>.txt. Wheels for missing packages are installed from .whl/ when present.
set -u
part=${1:-all}
LOG=${OUT:-/tmp}/log_${part}.txt
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
run() {  # run <seconds> <cmd...>
  local t=$1; shift
  echo "=== $(date -u +%T) \$ $*" | tee -a "$LOG"
  local s=$SECONDS
  timeout "$t" "$@" 2>&1 | grep -v -E "should be kept in float32|torchvision/models/_utils.py|warnings.warn" | tee -a "$LOG"
  echo "=== rc=${PIPESTATUS[0]} wall=$((SECONDS - s)) s" | tee -a "$LOG"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, diffusers, kornia, lpips, trimesh; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), '| diffusers', diffusers.__version__, '| kornia', kornia.__version__, '| trimesh', trimesh.__version__)"
} 2>&1 | tee -a "$LOG"
if [ "$part" = 1 ] || [ "$part" = all ]; then
  run 120 python3 bench/bench_predictor.py --sd --size 768 --device cuda --dtype fp16 --repeats 15
  run 150 python3 bench/bench_predictor.py --sd --size 768 --device cuda --dtype fp32 --repeats 15
  run 120 python3 bench/bench_jointnet.py --sd --res 512 --device cuda --dtype fp16 --repeats 20
  run 150 python3 bench/bench_diff2in1.py --sd --res 512 --device cuda
  run 60 python3 bench/bench_mesh.py --sizes 512x512 2048x512
  run 90 python3 -m pytest -q -p no:cacheprovider tests/unit/test_predictor.py tests/unit/test_jointnet.py -k "half"
fi
if [ -n "${COMFYUI_DIR:-}" ] && { [ "$part" = 3 ] || [ "$part" = all ]; }; then
  # the pack's loaders inside ComfyUI on the GPU: per node the first and the second (cached) run's time and peak
  # VRAM, and that ComfyUI's memory manager owns each model (load, reuse, unload, reload)
  REPO=$PWD
  run 300 bash -c "cd '$COMFYUI_DIR' && JD_PROBE_DEVICE=gpu python3 '$REPO/tests/integration/comfy_probe.py' models"
fi
if [ "$part" = 2 ] || [ "$part" = all ]; then
  run 420 python3 bench/bench_tiled.py --sd --device cuda --dtype fp16 --steps 50 --window 64 --pano-h 64 \
    --pano-w 256 --lpips vgg --repeats 1 --decode-h 128 --decode-w 512 --decode-tile 64
  run 90 python3 bench/bench_tiled.py --sd --device cuda --dtype fp32 --skip-sampling --decode-h 128 --decode-w 512 \
    --decode-tile 64
fi
