#!/usr/bin/env bash
# Set up everything this project needs on a fresh Debian machine:
#  - Debian's Rust toolchain with the library source (builds the no-SSE guest
#    offline; see shared/HOST.md), unless a rustup x86_64-unknown-none target exists;
#  - the Python package with its test dependencies (editable install).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")"

have_debian_rust() {
    [ -x /usr/bin/cargo ] && [ -x /usr/bin/rustc ] && [ -d /usr/lib/rustlib/src/rust/library/core ]
}
have_rustup_target() {
    command -v rustc >/dev/null 2>&1 &&
        [ -d "$(rustc --print sysroot 2>/dev/null)/lib/rustlib/x86_64-unknown-none" ]
}

if ! have_debian_rust && ! have_rustup_target; then
    echo "setup: installing Debian's Rust toolchain (cargo-web rustc-web rust-web-src)..." >&2
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq cargo-web rustc-web rust-web-src >/dev/null
fi

PY="${PYTHON:-python3}"
echo "setup: installing Python dependencies..." >&2
"$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[test]'
echo "setup: building the guest kernel..." >&2
"$PY" -m vmm.guest_build >/dev/null
echo "setup: done" >&2
