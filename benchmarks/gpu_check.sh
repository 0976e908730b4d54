#!/usr/bin/env bash
# GPU checks, run on a machine with one CUDA GPU (torch, transformers, accelerate installed; the
# wheels of `datasets`, `dill` and `multiprocess` carried in .whl/). Writes logs to $OUT (or ./gpu_out).
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
# make scalebio.llm/theory/toy_problems importable without installing (the folders map as in pyproject)
ln -sfn ../llm scalebio/llm; ln -sfn ../theory scalebio/theory; ln -sfn ../toy_problems scalebio/toy_problems
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu tests/llm/test_gpu.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
timeout 60 python3 benchmarks/llm_step.py --shape 10m --batch 8 --seq 512 --steps 5 --warmup 2 2>&1 | tee "$OUT/llm_step_10m.txt"
timeout 200 python3 benchmarks/llm_step.py --shape 8b --layers 6 --batch 4 --seq 512 --steps 2 --warmup 1 2>&1 | tee "$OUT/llm_step_8b.txt"
