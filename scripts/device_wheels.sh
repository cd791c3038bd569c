#!/usr/bin/env bash
# Run here, before a device call: fills the ignored folder .whl/ with the wheels the GPU image
# (Python 3.12, x86_64) lacks: those in ../shared/device-wheels (ml_collections,
# tensorflow-datasets, array_record, ...) and grain with its two small pure-Python needs
# (cloudpickle, portpicker) for the "stream" input pipeline, from the package registry.
# scripts/device_env.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
cp ../shared/device-wheels/*.whl .whl/
python3 -m pip download --quiet --dest .whl --no-deps --only-binary=:all: \
  --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  "grain==${GRAIN_VERSION:-0.2.18}" cloudpickle portpicker
ls .whl
