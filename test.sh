#!/usr/bin/env bash
# visor's test command: installs what the tests need, then runs the format and
# lint checks and every test (unit, conformance, bad input, Linux boot).
set -euo pipefail
cd "$(dirname "$0")"

need=()
ls /boot/vmlinuz-* >/dev/null 2>&1 || need+=(linux-image-amd64)
[ -x /bin/busybox ] || command -v busybox >/dev/null 2>&1 || need+=(busybox-static)
if [ ${#need[@]} -gt 0 ]; then
  echo "test.sh: installing ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace "$@"
