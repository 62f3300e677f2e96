#!/usr/bin/env bash
# Wheels for flash-attention 4 (flash_attn.cute, CuTe DSL kernels compiled on first use), fetched
# here (the GPU machine has no network) into the git-ignored .whl/fa4a and .whl/fa4b.
#
# nvidia-cutlass-dsl-libs-cu13 alone is 92 MB, over the 64 MiB a device call carries, so it travels
# cut in two: .whl/fa4a holds its first part and the small wheels, .whl/fa4b the rest. Already on
# the GPU machine: torch 2.11 (cu130), cuda-bindings, cuda-pathfinder, einops, protobuf.
#
# On the GPU machine, two calls while it stays warm:
#   1. carry .whl/fa4a:  mkdir -p /tmp/fa4 && cp .whl/fa4a/* /tmp/fa4/
#   2. carry .whl/fa4b:  cp .whl/fa4b/* /tmp/fa4/ && cat /tmp/fa4/cu13.part.* > /tmp/fa4/$CU13 && rm /tmp/fa4/cu13.part.* && \
#        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/fa4/*.whl
#      then also put /tmp/site/nvidia_cutlass_dsl/dsl_packages on PYTHONPATH: nvidia-cutlass-dsl adds
#      it with a .pth file, which Python reads only in site directories, not in a --target folder.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d "$work" \
    flash-attn-4==4.0.0b36 quack-kernels==0.6.5 nvidia-cutlass-dsl==4.8.1 \
    nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 \
    apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5
mkdir -p .whl/fa4a .whl/fa4b
cu13=$(basename "$work"/nvidia_cutlass_dsl_libs_cu13-*.whl)
split -b 46000000 "$work/$cu13" "$work/cu13.part."
mv "$work"/cu13.part.aa "$work"/flash_attn_4-*.whl "$work"/quack_kernels-*.whl "$work"/nvidia_cutlass_dsl-*.whl \
    "$work"/nvidia_cutlass_dsl_libs_core-*.whl "$work"/torch_c_dlpack_ext-*.whl .whl/fa4a/
mv "$work"/cu13.part.ab "$work"/nvidia_cutlass_dsl_libs_base-*.whl "$work"/apache_tvm_ffi-*.whl .whl/fa4b/
echo "CU13=$cu13"
du -sh .whl/fa4a .whl/fa4b
