#!/usr/bin/env bash
# Set up everything this project needs on a fresh Debian machine:
#  - Debian's Rust toolchain with the library source (builds the no-SSE guest
#    offline; see shared/HOST.md), unless a rustup x86_64-unknown-none target exists;
#  - binutils (c++filt demangles the guest's Rust symbols in fault reports) and
#    tmux (the live view's terminal test drives it);
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

# The tests' second KVM backend (vmm/svm: KVM-SVM nested in QEMU TCG): QEMU,
# a static busybox, and Debian's cloud kernel, which ships kvm-amd.ko. The
# kernel package is unpacked into the cache with dpkg-deb -x, never installed
# as this machine's kernel. `vmm svm` itself never touches the network.
SVM_LINUX="${PYVMM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pyvmm}/svm/linux"
svm_apt() {
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get "$@"
}
svm_kernel_pkg() {  # the versioned package behind the linux-image-cloud-amd64 metapackage
    apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}
svm_missing=""
command -v qemu-system-x86_64 >/dev/null 2>&1 || svm_missing="$svm_missing qemu-system-x86"
[ -x /bin/busybox ] || svm_missing="$svm_missing busybox-static"
svm_pkg="$(svm_kernel_pkg)"
if [ -n "$svm_missing" ] || [ -z "$svm_pkg" ]; then
    echo "setup: installing the SVM test backend's packages:${svm_missing:- (package lists)}..." >&2
    svm_apt update -qq
    [ -z "$svm_missing" ] || svm_apt install -y -qq --no-install-recommends $svm_missing >/dev/null
    svm_pkg="$(svm_kernel_pkg)"
fi
if [ -z "$svm_pkg" ]; then
    echo "setup: warning: linux-image-cloud-amd64 is not available from apt; the SVM test pass will be unavailable" >&2
elif [ ! -d "$SVM_LINUX/$svm_pkg/boot" ]; then
    echo "setup: unpacking $svm_pkg for the SVM test backend into $SVM_LINUX..." >&2
    svm_tmp="$(mktemp -d)"
    chmod 755 "$svm_tmp"  # apt's download sandbox user must be able to write here
    (cd "$svm_tmp" && svm_apt download -qq "$svm_pkg" >/dev/null 2>&1)
    mkdir -p "$SVM_LINUX"
    dpkg-deb -x "$svm_tmp"/*.deb "$SVM_LINUX/.$svm_pkg.tmp"
    rm -rf "$svm_tmp" "$SVM_LINUX/$svm_pkg"
    mv "$SVM_LINUX/.$svm_pkg.tmp" "$SVM_LINUX/$svm_pkg"
    for old in "$SVM_LINUX"/*/; do  # one kernel at a time
        [ "$old" = "$SVM_LINUX/$svm_pkg/" ] || rm -rf "$old"
    done
fi

# Debian tools the tests and fault reports use for real: readelf (binutils)
# reads snapshot core files, c++filt (binutils) demangles the guest's Rust
# symbols, tmux drives the live view's terminal test.
missing=()
command -v readelf >/dev/null 2>&1 || missing+=(binutils)
command -v c++filt >/dev/null 2>&1 || missing+=(binutils)
command -v tmux >/dev/null 2>&1 || missing+=(tmux)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}..." >&2
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
fi

if ! command -v gdb >/dev/null 2>&1; then
    # The gdb stub's tests drive a stock gdb (they skip, saying so, without it).
    echo "setup: installing gdb..." >&2
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq gdb >/dev/null
fi

PY="${PYTHON:-python3}"
echo "setup: installing Python dependencies..." >&2
# editable_mode=compat: the checkout goes on sys.path through a plain .pth
# line; the default import-hook finder costs every Python process on the
# machine ~10 ms at start-up (issue 17: `vmm run` to READY).
"$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[test]' \
    --config-settings editable_mode=compat
echo "setup: building the guest kernel..." >&2
"$PY" -m vmm.guest_build >/dev/null
echo "setup: done" >&2
