#!/usr/bin/env bash
# Wheels the GPU machine needs for bench/llm_step.py (it has no network and no megatron-core),
# fetched and built here into the git-ignored .whl/base (third-party) and .whl/ours (our packages,
# built as wheels so their `loongforge.plugins` entry points exist). About 4 MiB in all.
#
# On the GPU machine (carry .whl/base and .whl/ours):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/base/*.whl .whl/ours/*.whl
#   export PYTHONPATH=$(ls -d $PWD/packages/*/src | tr '\n' :)/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl/base .whl/ours
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d .whl/base \
    megatron-core==0.19.2 omegaconf==2.3.1 hydra-core==1.3.8
# torchao: the numerics reference of the FP8 GPU tests (optional: the tests skip without it)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl/base torchao==0.18.0 || echo "torchao wheel not fetched: its GPU test will skip"
# antlr4-python3-runtime 4.9.3 (what hydra-core pins) is published as an sdist only
python3 -m pip wheel -q --no-deps -w .whl/base antlr4-python3-runtime==4.9.3
for pkg in loongforge-core loongforge-models-llm loongforge-backend-cuda loongforge-kernels; do
    python3 -m uv build -q --wheel --package "$pkg" -o .whl/ours
done
du -sh .whl/base .whl/ours
