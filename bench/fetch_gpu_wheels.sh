#!/usr/bin/env bash
# Download the wheels of bench/gpu_wheels.txt into .whl/ (git-ignored) for the device machine:
# CPython 3.12 on manylinux x86-64, each alone (--no-deps: the list names every one needed).
#
#     bash bench/fetch_gpu_wheels.sh
#
# Then one device call carries .whl and runs (see bench/gpu_check.py's docstring):
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log; python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee $OUT/test_cuda.log
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
mkdir -p .whl
grep -v '^\s*#' bench/gpu_wheels.txt | grep -v '^\s*$' | while read -r pin; do
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$pin"
done
du -ch .whl/*.whl | tail -1
