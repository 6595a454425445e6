#!/usr/bin/env bash
# The wheels scripts/gpu_check.py installs on a lent GPU machine (Python 3.12, no network): the packages its image
# lacks, at the versions of this environment (the ones the suite passes with). Run on a machine with pip access, in
# the project's virtual environment, from the repository root:
#
#     bash scripts/gpu_wheels.sh .whl        # then carry .whl (git-ignored) with the GPU check
#
# The image already holds torch (a CUDA build), transformers, tensorboard, pytest, hypothesis, psutil, msgpack,
# ninja, py-cpuinfo and einops. DeepSpeed ships a source archive only: it is built here into a pure-Python wheel
# (DS_BUILD_OPS=0; its ops compile just in time on the GPU machine).
set -euo pipefail
dest="${1:?usage: bash scripts/gpu_wheels.sh DEST_FOLDER}"
mkdir -p "$dest"
version() { python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
binary=()
for name in megatron-core pydantic pydantic-core annotated-types typing-inspection hjson; do
    binary+=("$name==$(version "$name")")
done
python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dest" "${binary[@]}"
sdist="$(mktemp -d)"
python -m pip download --quiet --no-deps --no-binary=:all: -d "$sdist" "deepspeed==$(version deepspeed)"
DS_BUILD_OPS=0 python -m pip wheel --quiet --no-deps --no-build-isolation -w "$dest" "$sdist"/deepspeed-*.tar.gz
rm -rf "$sdist"
ls -l "$dest"
