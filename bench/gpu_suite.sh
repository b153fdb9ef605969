#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md in one run on a lent device (its python3 has torch, timm,
# accelerate; the rest travels as wheels in .whl/). Writes JSON under $OUT (default bench/results).
#   bash bench/gpu_suite.sh                      # everything
#   SECTIONS=objectives bash bench/gpu_suite.sh  # one part: objectives | engine
set -u
OUT=${OUT:-bench/results}
SECTIONS=${SECTIONS:-objectives engine}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
[ -e ssl_vit/eval ] || ln -s ../eval ssl_vit/eval   # what the editable install maps, without installing
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
step() { echo "== $*"; timeout "${LIMIT:-120}" "$@" || echo "!! failed ($?): $*"; }
objectives() {
  local run="python3 bench/objectives.py --steps 10 --warmup 3 --device cuda --bf16"
  step $run --preset b16 --batch 64 --out "$OUT/objectives-b16-bf16.json"
  step $run --preset l16 --batch 32 --out "$OUT/objectives-l16-bf16.json"
  # 4x the batch: how much of each ratio is launching kernels rather than FLOPs
  step $run --preset b16 --batch 256 --objectives mpp mae simclr mocov3 --out "$OUT/objectives-b16-b256-bf16.json"
  step $run --preset l16 --batch 128 --objectives mpp mae --out "$OUT/objectives-l16-b128-bf16.json"
  # element-wise kernels fused by torch.compile: what is left of MAE's gap is its narrow matmuls
  LIMIT=200 step $run --compile --preset b16 --batch 256 --objectives mpp mae --out "$OUT/objectives-b16-b256-bf16-compile.json"
  LIMIT=170 step $run --compile --preset l16 --batch 128 --objectives mae --out "$OUT/objectives-l16-b128-bf16-compile.json"
  for batch in 64 256; do
    for name in supervised mae; do
      step python3 bench/profile_step.py --objective $name --preset b16 --batch $batch --device cuda --bf16 \
        --out "$OUT/profile-$name-b16-b$batch-bf16.json"
    done
  done
}
engine() {
  step python3 bench/engine.py --device cuda --precision bf16 --preset vit_s16_224 --out "$OUT/engine-cuda-bf16.json"
  step python3 bench/features.py --model vit_base_patch16_224 --img-size 224 --images 4096 --batch-size 256 --device cuda --out "$OUT/features-cuda.json"
  step python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_engine.py tests/test_fsdp.py tests/test_global_bn.py
}
for section in $SECTIONS; do $section; done
