#!/usr/bin/env bash
# Regenerates proto/src/generated/ from proto/schema/*.fbs with flatc 23.5.26, the version
# that matches the pinned `flatbuffers` runtime crate.
#
#   proto/regen.sh          rewrite the generated code
#   proto/regen.sh --check  fail if the committed code differs from a fresh generation
#
# flatc: $FLATC if set; else `flatc` on PATH if it is 23.5.26; else it is built once from
# the C++ source that the crates.io package `flatc` vendors (needs cmake and a C++
# compiler; about 1.5 minutes on 2 cores) and cached in ~/.cache/imgate/.
set -euo pipefail
want=23.5.26
here=$(cd "$(dirname "$0")" && pwd)

find_flatc() {
  if [ -n "${FLATC:-}" ]; then echo "$FLATC"; return; fi
  if command -v flatc >/dev/null && flatc --version | grep -qx "flatc version $want"; then
    command -v flatc; return
  fi
  local cache="${XDG_CACHE_HOME:-$HOME/.cache}/imgate/flatc-$want"
  if [ ! -x "$cache/flatc" ]; then
    command -v cmake >/dev/null || { echo "regen: cmake is needed to build flatc $want" >&2; exit 1; }
    cargo fetch --quiet --manifest-path "$here/flatc/Cargo.toml" >&2
    local src
    src=$(cargo metadata --format-version 1 --manifest-path "$here/flatc/Cargo.toml" \
      | python3 -c 'import json,sys,os; m=json.load(sys.stdin); print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"]=="flatc"))')
    echo "regen: building flatc $want from $src/flatbuffers" >&2
    mkdir -p "$cache/build"
    cmake -S "$src/flatbuffers" -B "$cache/build" -DCMAKE_BUILD_TYPE=Release \
      -DFLATBUFFERS_BUILD_TESTS=OFF -DFLATBUFFERS_BUILD_FLATLIB=OFF \
      -DFLATBUFFERS_BUILD_FLATHASH=OFF >/dev/null
    cmake --build "$cache/build" --target flatc -j"$(nproc)" >/dev/null
    cp "$cache/build/flatc" "$cache/flatc"
  fi
  echo "$cache/flatc"
}

flatc=$(find_flatc)
"$flatc" --version | grep -qx "flatc version $want" || {
  echo "regen: $flatc is $("$flatc" --version), want $want" >&2; exit 1; }

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$flatc" --rust -o "$out" "$here"/schema/*.fbs

if [ "${1:-}" = "--check" ]; then
  if ! diff -ru "$here/src/generated" "$out"; then
    echo "regen: proto/src/generated is stale; run proto/regen.sh and commit" >&2
    exit 1
  fi
  echo "regen: generated code is current (flatc $want)"
else
  rm -rf "$here/src/generated"
  mkdir -p "$here/src/generated"
  cp "$out"/*.rs "$here/src/generated/"
  echo "regen: wrote proto/src/generated (flatc $want)"
fi
