#!/usr/bin/env bash
# Check the GPU code against the GPU machine's versions on this CPU machine, before a GPU session spends device time:
#   bash scripts/gpu_image_check.sh
# .venv-gpu-image gets the GPU image's torch 2.11, triton 3.6 and transformers 5.17 (torch 2.11 is PyPI's CUDA build,
# ~5 GB with its CUDA libraries; it imports without a GPU). numpy < 2.3: Triton 3.6's interpreter turns one-element
# arrays into ints, which numpy 2.3 refuses. Then: the sm_90 builds of every kernel variant and torch's write analysis
# (test_kernel_compile), the kernels and decode paths in Triton's interpreter, and the smoke run of gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-gpu-image
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.11.0 triton==3.6.0 transformers==5.17.0 accelerate==1.15.0 "numpy<2.3" -e ".[test]"
"$VENV/bin/python" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
exec "$VENV/bin/python" -P -m pytest -q -p no:cacheprovider tests/test_kernel_compile.py tests/test_topk_kernels.py \
  tests/test_decode_paths.py tests/test_gpu_check.py "$@"
