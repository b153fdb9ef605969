#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md in one run on a lent device (its python3 has torch, timm,
# accelerate; the rest travels as wheels in .whl/). Writes JSON under $OUT (default bench/results).
#   bash bench/gpu_suite.sh
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
[ -e ssl_vit/eval ] || ln -s ../eval ssl_vit/eval   # what the editable install maps, without installing
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
step() { echo "== $*"; timeout 150 "$@" || echo "!! failed ($?): $*"; }
step python3 bench/objectives.py --preset b16 --batch 64 --steps 10 --warmup 3 --device cuda --bf16 --out "$OUT/objectives-b16-bf16.json"
step python3 bench/objectives.py --preset l16 --batch 32 --steps 10 --warmup 3 --device cuda --bf16 --out "$OUT/objectives-l16-bf16.json"
step python3 bench/engine.py --device cuda --precision bf16 --preset vit_s16_224 --out "$OUT/engine-cuda-bf16.json"
step python3 bench/features.py --model vit_base_patch16_224 --img-size 224 --images 4096 --batch-size 256 --device cuda --out "$OUT/features-cuda.json"
step python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_engine.py
