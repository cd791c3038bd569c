# Sourced by the device scripts: installs the carried wheels (ml_collections, tensorflow-datasets,
# array_record, ...; the GPU image lacks them) into /tmp/site and puts them and the repository on
# PYTHONPATH. Expects PY (the interpreter) and LOG (the log file) to be set.
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl 2>&1 | tee -a "$LOG"
export PYTHONPATH=/tmp/site:$PWD
