#!/usr/bin/env bash
# The project's GPU check, meant to run in ONE call on a lent GPU machine (device tool):
#   GPU tests (compiled Triton kernels, bf16), kernel and training benchmarks.
# Needs torch, triton, timm, pytest there; fire/wandb are not needed for this script.
# Results go to $OUT (or ./gpu_check): paste the tables into BENCHMARKS.md with the device name.
set -u
out=${OUT:-gpu_check}
mkdir -p "$out"
python3 -m pip install --quiet --no-deps --no-build-isolation -e . > "$out/install.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$out/device.txt"
timeout 240 python3 -m pytest -q -m gpu tests/test_kernels.py 2>&1 | tail -n 30 > "$out/gpu_tests.txt"
timeout 240 python3 -c "from vitprune.bench import bench_kernels; bench_kernels()" > "$out/bench_kernels.md" 2>&1
timeout 120 python3 -c "from vitprune.bench import bench_train; bench_train(model='vit_small', batch=512)" \
    > "$out/bench_train.md" 2>&1
tail -n 5 "$out"/*.txt "$out"/*.md
