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

SRCS="src/kv_attn.c src/kv_attn_scalar.c src/kv_attn_neon.c src/kv_attn_avx2.c \
src/kv_attn_avx512.c src/kv_tiers.c src/kv_tiers_avx2.c"
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

echo "=== native ($($CC -dumpmachine)) ==="
# shellcheck disable=SC2086
if run $CC $FLAGS tools/kernel_check.c $SRCS -lm -o "$BUILD_DIR/kernel_check_native"; then
    run "$BUILD_DIR/kernel_check_native" "$@"
    rc=$?
    echo "native: exit $rc"
    [ $rc -eq 0 ] || status=1
else
    echo "native: BUILD FAILED"
    status=1
fi

if [ "${SANITIZE:-0}" = 1 ]; then
    echo
    echo "=== native, -fsanitize=address,undefined ==="
    # shellcheck disable=SC2086
    if run $CC -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined \
        -fno-sanitize-recover=undefined -ffp-contract=off -fno-trapping-math -Iinclude -Isrc \
        tools/kernel_check.c $SRCS -lm -o "$BUILD_DIR/kernel_check_asan"; then
        run "$BUILD_DIR/kernel_check_asan" "$@"
        rc=$?
        echo "sanitized: exit $rc"
        [ $rc -eq 0 ] || status=1
    else
        echo "sanitized: BUILD FAILED"
        status=1
    fi
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
        if run $CROSS_CC $FLAGS -static tools/kernel_check.c $SRCS -lm \
            -o "$BUILD_DIR/kernel_check_aarch64"; then
            run "$QEMU" "$BUILD_DIR/kernel_check_aarch64" "$@"
            rc=$?
            echo "aarch64: exit $rc"
            [ $rc -eq 0 ] || status=1
        else
            echo "aarch64: BUILD FAILED"
            status=1
        fi
    fi
fi

echo
if [ $status -eq 0 ]; then
    echo "aarch64_check: PASS"
else
    echo "aarch64_check: FAIL"
fi
exit $status
