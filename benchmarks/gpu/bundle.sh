#!/usr/bin/env bash
# Downloads the wheels the GPU image lacks (benchmarks/gpu/wheels.txt) for CPython 3.12,
# manylinux x86_64, into benchmarks/gpu/wheels/ (git-ignored; the device run carries it),
# and prints their total size. Run here, where the package registry is reachable:
#   bash benchmarks/gpu/bundle.sh            # or: PYTHON=.venv/bin/python bash ...
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/wheels}"
python="${PYTHON:-python3}"
# What travels with a device run is at most 64 MiB, the working tree included.
limit_mib=32

rm -rf "$out"
mkdir -p "$out"
# pip matches manylinux tags exactly: name every tag a wheel of these packages may carry.
platforms=()
for tag in manylinux_2_{17,24,27,28,31,34,35}_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
"$python" -m pip download --quiet --disable-pip-version-check --no-deps \
  --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -r "$here/wheels.txt" -d "$out"

count=$(ls "$out"/*.whl | wc -l)
expected=$(grep -cE '^[A-Za-z0-9]' "$here/wheels.txt")
if [ "$count" -ne "$expected" ]; then
  echo "bundle: $count wheels for $expected requirements in $out" >&2
  exit 1
fi
ls -l "$out"/*.whl | awk '{printf "  %8.2f MiB  %s\n", $5 / 1048576, $NF}'
total=$(du -cb "$out"/*.whl | tail -1 | cut -f1)
mib=$(awk -v b="$total" 'BEGIN { printf "%.2f", b / 1048576 }')
echo "bundle: $count wheels, $mib MiB in $out"
if awk -v m="$mib" -v l="$limit_mib" 'BEGIN { exit !(m > l) }'; then
  echo "bundle: over $limit_mib MiB; the device run carries at most 64 MiB in all" >&2
  exit 1
fi
