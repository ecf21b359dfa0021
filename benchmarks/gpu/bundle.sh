#!/usr/bin/env bash
# Downloads the wheels the GPU image lacks (benchmarks/gpu/wheels.txt) for CPython 3.12,
# manylinux x86_64, into benchmarks/gpu/wheels/ (git-ignored; the device run carries it),
# checks them and prints their total size. Run here, where the package registry is reachable:
#   bash benchmarks/gpu/bundle.sh            # or: PYTHON=.venv/bin/python bash ...
#   bash benchmarks/gpu/bundle.sh --check    # only check the folder (run_all.sh does too)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
check_only=0
if [ "${1:-}" = "--check" ]; then
  check_only=1
  shift
fi
out="${1:-$here/wheels}"
python="${PYTHON:-python3}"
# What travels with a device run is at most 64 MiB, the working tree included.
limit_mib=32

# Every requirement of wheels.txt has its one wheel (name-version-*.whl) in $out, and
# nothing else is there (two versions of a package stop the whole install).
check() {
  local missing=() line name version file_name expected=0
  while IFS= read -r line; do
    line="${line%%#*}"
    line="${line//[[:space:]]/}"
    [ -z "$line" ] && continue
    expected=$((expected + 1))
    name="${line%%==*}"
    version="${line#*==}"
    file_name="$(echo "$name" | tr 'A-Z-' 'a-z_')"
    if ! compgen -G "$out/$file_name-$version-*.whl" > /dev/null; then
      missing+=("$line")
    fi
  done < "$here/wheels.txt"
  local count
  count=$(compgen -G "$out/*.whl" | wc -l || true)
  if [ "${#missing[@]}" -gt 0 ] || [ "$count" -ne "$expected" ]; then
    echo "bundle: $out holds $count wheels for the $expected requirements of wheels.txt" \
         "(missing: ${missing[*]:-none}); run bash benchmarks/gpu/bundle.sh in the" \
         "checkout the device tool sends, and carry benchmarks/gpu/wheels" >&2
    return 1
  fi
  local total mib
  total=$(du -cb "$out"/*.whl | tail -1 | cut -f1)
  mib=$(awk -v b="$total" 'BEGIN { printf "%.2f", b / 1048576 }')
  echo "bundle: $count wheels for the $expected requirements of wheels.txt, $mib MiB, in $out"
  if awk -v m="$mib" -v l="$limit_mib" 'BEGIN { exit !(m > l) }'; then
    echo "bundle: over $limit_mib MiB; the device run carries at most 64 MiB in all" >&2
    return 1
  fi
}

if [ "$check_only" = 1 ]; then
  check
  exit
fi
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
ls -l "$out"/*.whl | awk '{printf "  %8.2f MiB  %s\n", $5 / 1048576, $NF}'
check
