#!/usr/bin/env bash
# Reference environment for the Pi0.5 parity tests against lerobot (packages/loongforge-embodied/tests/
# test_pi05_lerobot_parity.py): lerobot 0.6.1 declares torch < 2.12 and (extras) transformers < 5.6,
# which conflict with the workspace lock (torch 2.15, transformers 5.23), so it cannot join the lock.
# Its pi05 network code runs unchanged on our torch/transformers; this installs lerobot and the few
# pure-Python modules its import chain needs WITHOUT dependencies into a side directory, which the
# test run puts on PYTHONPATH. Nothing in the workspace .venv changes. No weights are downloaded.
#
#   scripts/lerobot_ref_env.sh [DIR]      # default DIR=/tmp/lerobot_ref; then run the tests it prints
set -euo pipefail
DIR="${1:-/tmp/lerobot_ref}"
cd "$(dirname "$0")/.."
python3 -m uv pip install --quiet --no-deps --target "$DIR" \
    "lerobot==0.6.1" "draccus==0.11.6" mergedeep typing-inspect mypy-extensions toml pyyaml-include \
    einops termcolor gymnasium cloudpickle farama-notifications "opencv-python-headless<4.14" \
    requests urllib3 idna charset-normalizer certifi "torchvision==0.29.2"
# torchvision 0.29 (the newest on the index) is built for an older torch: only its Python side is
# imported by lerobot's config modules; no torchvision operator is used by the pi05 network.
echo "reference env ready in $DIR; run:"
echo "  PYTHONPATH=$DIR python3 -m uv run pytest -W ignore packages/loongforge-embodied/tests/test_pi05_lerobot_parity.py -q"
