#!/usr/bin/env bash
# Run here, before a device call: fills the ignored folder .whl/ (emptied first: two versions of
# one package stop the whole install there) with the wheels the GPU image (Python 3.12, x86_64)
# lacks: those in ../shared/device-wheels (ml_collections, tensorflow-datasets, array_record, ...)
# and grain with portpicker, its one small pure-Python need the image lacks (cloudpickle is
# there), for the "stream" input pipeline, from the package registry, at pinned versions.
# scripts/device_env.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
mkdir -p .whl
cp ../shared/device-wheels/*.whl .whl/
python3 -m pip download --quiet --dest .whl --no-deps --only-binary=:all: \
  --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  "grain==${GRAIN_VERSION:-0.2.18}" "portpicker==${PORTPICKER_VERSION:-1.6.0}"
ls .whl
