#!/usr/bin/env bash
# visor's test command: installs what the tests need, then runs the format and
# lint checks and every test (unit, conformance, bad input, Linux boot).
set -euo pipefail
cd "$(dirname "$0")"

need=()
ls /boot/vmlinuz-* >/dev/null 2>&1 || need+=(linux-image-amd64)
[ -x /bin/busybox ] || command -v busybox >/dev/null 2>&1 || need+=(busybox-static)
command -v gdb >/dev/null 2>&1 || need+=(gdb)
command -v iasl >/dev/null 2>&1 || need+=(acpica-tools)
if [ ${#need[@]} -gt 0 ]; then
  echo "test.sh: installing ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Every engine this machine can run is required: a test of an engine that
# stops working fails instead of printing SKIPPED. Software engines always
# run; kvm needs a usable /dev/kvm (VISOR_KVM_DEVICE points elsewhere).
if [ -z "${VISOR_REQUIRE_ENGINES:-}" ] && [ -r "${VISOR_KVM_DEVICE:-/dev/kvm}" ] && [ -w "${VISOR_KVM_DEVICE:-/dev/kvm}" ]; then
  export VISOR_REQUIRE_ENGINES=1
fi
echo "test.sh: VISOR_REQUIRE_ENGINES=${VISOR_REQUIRE_ENGINES:-unset}"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace "$@"
