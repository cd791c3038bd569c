# Sourced by the device scripts: installs the carried wheels (ml_collections, tensorflow-datasets,
# array_record, ...; the GPU image lacks them) into /tmp/site and puts them and the repository on
# PYTHONPATH; stops the script when the install fails (every section would fail without them).
# Expects PY (the interpreter) and LOG (the log file) to be set.
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl 2>&1 | tee -a "$LOG"
if ((PIPESTATUS[0] != 0)); then
  echo "=== the carried wheels did not install (above); stopping" | tee -a "$LOG"
  exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
