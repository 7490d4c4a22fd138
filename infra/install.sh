#!/usr/bin/env bash
# Install klein-ray with a CUDA build of torch into a virtual environment: the image's only
# Python install step. infra/Dockerfile runs exactly this script, and tests/test_deploy.py runs it
# on the files the Dockerfile copies, with `--dry-run --report FILE`, to resolve the image's
# packages (torch's CUDA libraries, ray with its dashboard) without downloading gigabytes.
#
# Usage: infra/install.sh SRC VENV [extra `pip install` options]
#   SRC   the project (pyproject.toml, README.md, klein_ray/)
#   VENV  the virtual environment to create (the image puts VENV/bin first on PATH)
# TORCH_SPEC picks torch (default: the Makefile's pin). PyPI's Linux x86_64 torch wheels are CUDA
# builds that bring their own CUDA libraries, so the base image needs only the driver's side.
set -euo pipefail
usage="usage: infra/install.sh SRC VENV [pip options]"
SRC=${1:?$usage}
VENV=${2:?$usage}
shift 2
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

"$PYTHON" -m venv "$VENV"
# torch and the project in one resolution, so every version pip picks agrees with the others.
"$VENV/bin/pip" install --no-cache-dir --disable-pip-version-check "$@" "$TORCH_SPEC" "$SRC"
