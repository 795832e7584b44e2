#!/usr/bin/env bash
# Runs tube's benchmark harness: installs what it needs when missing, then builds and runs it.
# Flags go to the harness, e.g.: bench/run.sh --size 256M --runs 3   (see --help)
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v socat >/dev/null || missing+=(socat)
command -v redis-server >/dev/null || missing+=(redis-server)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

exec cargo run --release --locked -p tube-bench -- "$@"
