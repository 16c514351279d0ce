#!/usr/bin/env bash
# Download, on a machine with a package index, the wheels a bare GPU node needs for
# benchmarks/gpu_run.sh (its image brings torch, numpy, pyarrow, safetensors, fsspec, accelerate,
# tokenizers, huggingface-hub, matplotlib, h5py, pillow; not these). Two sets, each under the
# 64 MiB a device call may carry:
#   .whl-a/  bitsandbytes, transformers (the pinned version), pydantic and its small deps
#   .whl-b/  av (PyAV), peft
# Usage: bash benchmarks/gpu_wheels.sh [PYTHON_VERSION]   (default 3.12, the GPU image's python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
pin() { grep -i "^$1==" constraints.txt | head -1; }
fetch() {
  local dest=$1; shift
  mkdir -p "$dest"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dest" "$@"
}
fetch .whl-a "$(pin bitsandbytes)" "$(pin transformers)" "$(pin pydantic)" "$(pin pydantic_core)" \
  "$(pin annotated-types)" "$(pin typing-inspection)" "$(pin typing_extensions)"
fetch .whl-b "$(pin av)" "$(pin peft)"
du -sh .whl-a .whl-b
