#!/usr/bin/env bash
# Wheels for bench/torchtitan_row.py, fetched here (the GPU machine has no network) into the
# git-ignored .whl/titan/. All pure Python, about 1.7 MiB.
#
# torchtitan 0.2.2, not 0.3.0: 0.3.0's llama3 package imports
# torch.distributed.fsdp.DataParallelMeshDims, which torch 2.11 (the GPU machine's) lacks.
# The rest is what `import torchtitan.models.llama3` really imports (the package __init__ pulls in
# its config system and dataloaders): tyro (+ docstring_parser, typeguard), torchdata, datasets
# (+ dill, multiprocess). Everything else on that import chain is already on the GPU machine
# (tensorboard, tokenizers, pyarrow, pandas, xxhash, huggingface_hub 1.33, fsspec, requests, ...).
#
# On the GPU machine (carry .whl):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/titan-site .whl/titan/*.whl && export PYTHONPATH=/tmp/titan-site:$PYTHONPATH
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl/titan
mkdir -p "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$dest" \
    torchtitan==0.2.2 \
    tyro==1.0.17 docstring_parser==0.18.0 typeguard==4.6.0 \
    torchdata==0.11.0 \
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
ls -l "$dest"
du -sh "$dest"
