#!/usr/bin/env bash
# The prepared GPU run (docs/benchmarks.md, "The GPU run"): checks and installs the wheel
# bundle (benchmarks/gpu/wheels/, made here by bundle.sh) into a temporary target, then
# runs benchmarks/gpu/run_all.py, which writes its JSON files into OUT_DIR and ends
# within 9 minutes of this script's start.
#   bash benchmarks/gpu/run_all.sh OUT_DIR           # GPU machine
#   bash benchmarks/gpu/run_all.sh OUT_DIR --tiny    # CPU, tiny shapes, no bundle
set -euo pipefail
VGG_GPU_RUN_STARTED="$(date +%s.%N)"  # run_all.py counts its time limit from here
export VGG_GPU_RUN_STARTED
out="${1:?usage: run_all.sh OUT_DIR [--tiny] [--parts=...]}"
shift
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
python="${PYTHON:-python3}"
cd "$repo"
tiny=0
for arg in "$@"; do [ "$arg" = "--tiny" ] && tiny=1; done
if [ "$tiny" = 0 ]; then
  bash "$here/bundle.sh" --check
  site="$(mktemp -d /tmp/vgg_site.XXXXXX)"
  "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
    --disable-pip-version-check --target "$site" "$here"/wheels/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$python" benchmarks/gpu/run_all.py --out="$out" "$@"
