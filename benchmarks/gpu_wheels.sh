#!/usr/bin/env bash
# Fetch, on this (CPU) machine, the wheels the GPU machine lacks, for its Python 3.12 (the device image has
# torch, torchvision, timm, numpy, pandas, xarray, typer, rich, fsspec, safetensors, scikit-learn, pyyaml):
# they travel in .whl (ignored by git; name it in the device tool's `carry`) and benchmarks/gpu_check.py
# installs them there. zarr imports google_crc32c at import; pydantic needs typing_extensions >= 4.16. Versions are this project's, as resolved in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
EXCLUDE=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$EXCLUDE")"
grep -qxF '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >> "$EXCLUDE"
PKGS="zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 typing_extensions==4.16.0
pydantic==2.14.3 pydantic_core==2.50.4
annotated-types==0.8.0 typing-inspection==0.4.5 braceexpand==0.1.7 open_clip_torch==3.3.0 ftfy==6.3.1
wcwidth==0.9.4 himalaya==0.4.11"
rm -rf .whl && mkdir .whl
# shellcheck disable=SC2086
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl $PKGS
du -sh .whl
