#!/usr/bin/env bash
# aarch64_check.sh -- run tools/kernel_check.c natively and on AArch64 (qemu).
#
# Builds the standalone attention-kernel check (tools/kernel_check.c) with
# the kernel and codec sources twice:
#   1. natively with gcc: on x86-64 this exercises the scalar kernel and,
#      where the CPU (and OS) run them, the avx2 and avx512 variants;
#   2. cross-compiled with aarch64-linux-gnu-gcc (static) and run under
#      qemu-aarch64-static (or qemu-aarch64): the scalar and neon variants.
# Both must pass (exit 0); the script exits non-zero if either fails.
#
# Installs nothing by itself.  On Debian/Ubuntu the tools come from:
#   apt-get install -y gcc-aarch64-linux-gnu qemu-user-static
# (or qemu-user, which provides qemu-aarch64 instead of qemu-aarch64-static).
#
# Usage, from the repository root:
#   bash tools/aarch64_check.sh [kernel_check options, e.g. --tol-scalar 2e-6]
# Environment: BUILD_DIR (default: a fresh temporary directory),
#   CC (default gcc), CROSS_CC (default aarch64-linux-gnu-gcc),
#   SANITIZE=1 adds a native -fsanitize=address,undefined build and run,
#   SKIP_AARCH64=1 runs the native checks only (no cross compiler needed).
set -u

cd "$(dirname "$0")/.." || exit 2

SRCS="src/kv_cpu.c src/kv_attn.c src/kv_attn_scalar.c src/kv_attn_neon.c src/kv_attn_avx2.c \
src/kv_attn_avx512.c src/kv_tiers.c src/kv_tiers_scalar.c src/kv_tiers_avx2.c"
FLAGS="-O3 -ffp-contract=off -fno-trapping-math -Iinclude -Isrc"
CC=${CC:-gcc}
CROSS_CC=${CROSS_CC:-aarch64-linux-gnu-gcc}
BUILD_DIR=${BUILD_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/kernel_check.XXXXXX")}
mkdir -p "$BUILD_DIR"

status=0

run() {   # echo a command, then run it
    echo "+ $*"
    "$@"
}

# check LABEL EXE-PREFIX -- COMPILER-AND-FLAGS...: build tools/kernel_check.c
# with the kernel sources, run it (under EXE-PREFIX, e.g. qemu; "" for none)
# with this script's arguments, and record a failure of either step.
check() {
    local label=$1 prefix=$2 exe="$BUILD_DIR/kernel_check_$1"
    shift 3
    # shellcheck disable=SC2086
    if run "$@" tools/kernel_check.c $SRCS -lm -o "$exe"; then
        run $prefix "$exe" "${ARGS[@]}"
        rc=$?
        echo "$label: exit $rc"
        [ $rc -eq 0 ] || status=1
    else
        echo "$label: BUILD FAILED"
        status=1
    fi
}
ARGS=("$@")

echo "=== native ($($CC -dumpmachine)) ==="
# shellcheck disable=SC2086
check native "" -- $CC $FLAGS

if [ "${SANITIZE:-0}" = 1 ]; then
    echo
    echo "=== native, -fsanitize=address,undefined ==="
    # shellcheck disable=SC2086
    check sanitized "" -- $CC -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined \
        -fno-sanitize-recover=undefined -ffp-contract=off -fno-trapping-math -Iinclude -Isrc
fi

if [ "${SKIP_AARCH64:-0}" = 1 ]; then
    echo
    echo "=== aarch64: skipped (SKIP_AARCH64=1) ==="
else
    echo
    echo "=== aarch64 (cross-compiled, under qemu) ==="
    QEMU=""
    for q in qemu-aarch64-static qemu-aarch64; do
        if command -v "$q" >/dev/null 2>&1; then
            QEMU=$q
            break
        fi
    done
    if ! command -v "$CROSS_CC" >/dev/null 2>&1; then
        echo "aarch64: $CROSS_CC not found (apt-get install -y gcc-aarch64-linux-gnu)"
        status=1
    elif [ -z "$QEMU" ]; then
        echo "aarch64: qemu-aarch64(-static) not found (apt-get install -y qemu-user-static)"
        status=1
    else
        # shellcheck disable=SC2086
        check aarch64 "$QEMU" -- $CROSS_CC $FLAGS -static
    fi
fi

echo
if [ $status -eq 0 ]; then
    echo "aarch64_check: PASS"
else
    echo "aarch64_check: FAIL"
fi
exit $status
