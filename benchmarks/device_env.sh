# Sourced by the device scripts: run from the repository root, install the carried official wheels
# (.whl/, gitignored) into /tmp/site, and put them and src/ on the path (the device has no fastxlstm installed).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
