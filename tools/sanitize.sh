#!/usr/bin/env bash
# sanitize.sh -- build the compiled core with AddressSanitizer +
# UndefinedBehaviorSanitizer and run the test suite against that build.
#
# The sanitized build never touches this checkout: the tracked and
# untracked-but-not-ignored files are copied into a temporary directory
# (cythonize writes kvcache/_core.c next to the .pyx, so building here would
# clobber the regular build's generated C), the extension is built in place
# there, and pytest runs from that copy with PYTHONPATH pointing at it.  A
# pytest plugin (written below) fails the session unless kvcache._core was
# imported from the sanitized copy, so an editable or regular install of the
# normal build can never be tested by mistake.
#
# Build flags: -fsanitize=address,undefined -fno-omit-frame-pointer -O1 -g
# -fno-sanitize-recover=undefined (any UB report aborts the process).
# setup.py appends its own -O3 after CFLAGS, which would win; so by default
# KVCACHE_DEBUG=1 is set, which replaces -O3 with "-O0 -g" *and* turns on
# Cython's boundscheck/wraparound/initializedcheck (an out-of-range index in
# the .pyx then raises IndexError instead of silently reading memory).
# SANITIZE_DEBUG=0 keeps setup.py's -O3 (closer to the shipped code, no
# Cython checks, somewhat faster).
#
# Run time: python is not instrumented, so libasan is LD_PRELOADed (it must
# be the first DSO loaded; libubsan is then pulled in by the extension's own
# DT_NEEDED).  PYTHONMALLOC=malloc routes every Python allocation through
# ASan's malloc so overflows from C into Python/numpy buffers are caught too.
# detect_leaks=0: CPython does not free everything at exit (interned
# strings, static types, module state, numpy's caches) so LeakSanitizer would
# report thousands of leaks that are not ours and fail every run.  Leaks in
# the core are checked by tools/valgrind_core.sh (definite leaks only) instead.
#
# Tests: the whole suite except tests/test_transformers.py (needs torch and a
# model; not a C-extension test), tests/test_bench_external.py and one
# test that needs plain malloc (see the pytest line below).  HYPOTHESIS_PROFILE defaults to "dev" (20
# examples per property instead of the CI profile's 500): under ASan the
# "ci" profile takes ~3x the normal run time; the dev profile still runs
# every test function and every code path the properties reach, at the cost
# of fewer random examples.  SANITIZE_PROFILE=ci runs the full profile.
#
# Usage, from anywhere:
#   bash tools/sanitize.sh [extra pytest args, e.g. -x or -k attention]
# Environment: SANITIZE_DEBUG (default 1), SANITIZE_PROFILE (default dev),
#   KEEP=1 keeps the temporary directory, CC (default gcc),
#   SANITIZE_EXTRA_CFLAGS appended to the sanitizer flags (e.g.
#   -fno-sanitize=alignment to look past a known alignment report).
# Exit status: 0 PASS; non-zero on a build failure, a failing test or any
# sanitizer report (the last line says PASS or FAIL).
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CC=${CC:-gcc}
PY=${PYTHON:-python3}
PY=$("$PY" -c 'import sys; print(sys.executable)')   # the real binary, not a shim
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kvcache_sanitize.XXXXXX")
SRC=$WORK/src
LOG=$WORK/pytest.log

cleanup() { [ "${KEEP:-0}" = 1 ] && echo "kept $WORK" || rm -rf "$WORK"; }
trap cleanup EXIT

fail() { echo "sanitize: FAIL ($*)"; exit 1; }

start=$(date +%s)

# --- copy the checkout (what git would commit, plus untracked new files)
mkdir -p "$SRC"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard) |
    (cd "$REPO" && xargs -0 cp --parents -t "$SRC" 2>/dev/null)
# ls-files lists deleted-but-tracked files too; cp skips them (hence 2>/dev/null)
[ -f "$SRC/setup.py" ] || fail "could not copy the checkout"
rm -f "$SRC"/kvcache/*.so "$SRC"/kvcache/_core.c

# --- build, sanitized
SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined -g ${SANITIZE_EXTRA_CFLAGS:-}"
echo "=== building with $SAN (KVCACHE_DEBUG=${SANITIZE_DEBUG:-1}) ==="
if ! (cd "$SRC" && CC=$CC KVCACHE_DEBUG=${SANITIZE_DEBUG:-1} \
        CFLAGS="$SAN -O1" LDFLAGS="-fsanitize=address,undefined" \
        "$PY" setup.py -q build_ext --inplace > "$WORK/build.log" 2>&1); then
    cat "$WORK/build.log"
    fail "build"
fi
SO=$(ls "$SRC"/kvcache/_core*.so 2>/dev/null | head -1)
[ -n "$SO" ] || fail "no extension built"
# (ldd's output captured first: with pipefail, `ldd | grep -q` fails whenever
# grep quits early and ldd dies of SIGPIPE.)
deps=$(ldd "$SO")
grep -q libasan <<< "$deps" || fail "$SO is not linked against libasan"
grep -q libubsan <<< "$deps" || fail "$SO is not linked against libubsan"
build_done=$(date +%s)
echo "built $SO in $((build_done - start)) s"

# --- run-time environment
LIBASAN=$($CC -print-file-name=libasan.so)
[ -f "$LIBASAN" ] || fail "libasan.so not found ($LIBASAN)"
export LD_PRELOAD=$LIBASAN
export PYTHONMALLOC=malloc
# detect_leaks=0: see the header.  abort_on_error=0/exitcode: ASan exits 1
# after its report.  allocator_may_return_null: a huge request (tests of
# bad sizes) raises MemoryError instead of ASan aborting on it.
# pytest's default --capture=fd points file descriptor 2 at a temporary file
# during each test, so a report written to stderr vanished with it when the
# process aborted (seen: pytest exiting 1 mid-run, no message at all).  So
# pytest runs with --capture=sys (fd 2 stays the terminal/log) and ASan also
# writes to $WORK/san/asan.<pid> (children included), printed below.
mkdir -p "$WORK/san"
export ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1:detect_stack_use_after_return=1:log_path=$WORK/san/asan:${ASAN_OPTIONS:-}
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}
export PYTHONPATH=$SRC${PYTHONPATH:+:$PYTHONPATH}
export HYPOTHESIS_PROFILE=${SANITIZE_PROFILE:-dev}
export PYTHONDONTWRITEBYTECODE=1

# A plugin that refuses to test any build but the sanitized one.
mkdir -p "$WORK/plugin"
cat > "$WORK/plugin/kvcache_sanitized_check.py" <<EOF
import pytest

import sys

# torch (and what builds on it: transformers, optimum-quanto) is left out:
# its C++ exceptions abort in the __cxa_throw interceptor of a preloaded
# libasan ("CHECK failed: asan_interceptors.cpp ... real___cxa_throw"), and
# it is not this build's code.  Importing it raises ImportError here, so the
# tests take their "not installed" paths (the regular run covers the rest).
for _name in ("torch", "transformers", "optimum", "optimum.quanto"):
    sys.modules[_name] = None

def pytest_sessionstart(session):
    import kvcache._core as c
    where = c.__file__
    if where != "$SO":
        raise pytest.UsageError(f"kvcache._core imported from {where}, not the sanitized build $SO")
    print(f"sanitized kvcache._core: {where} (backend {c.backend()})")
EOF
export PYTHONPATH=$WORK/plugin:$PYTHONPATH

echo "=== pytest (HYPOTHESIS_PROFILE=$HYPOTHESIS_PROFILE, ASAN_OPTIONS=$ASAN_OPTIONS) ==="
# cd into the copy: its pyproject supplies addopts/pythonpath, its tests run.
# Left out: the transformers tests and the comparisons with torch, quanto and
# blosc2 (third-party C/C++, not this build's code; torch is hidden, above),
# and the absurd-capacity test, which needs malloc itself to fail under an
# address-space limit (ASan's allocator reserves and maps differently: the
# child is killed instead).
(cd "$SRC" && "$PY" -m pytest -p kvcache_sanitized_check -p no:cacheprovider -q --capture=sys \
    --ignore=tests/test_transformers.py --ignore=tests/test_bench_external.py \
    --deselect tests/test_bad_input.py::test_absurd_capacities_raise_memory_error \
    "$@") 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
end=$(date +%s)

# Any sanitizer log fails the run, also one from a subprocess a test started
# (tests/test_attention.py starts children) that pytest itself did not see.
reports=0
for f in "$WORK"/san/*; do
    [ -e "$f" ] || continue
    echo "=== sanitizer report $(basename "$f") ==="
    cat "$f"
    # allocator_may_return_null=1 logs a warning for each allocation it refused
    # (tests/test_bad_input.py asks for absurd capacities on purpose and checks
    # the MemoryError); a log with nothing else in it is not a finding.
    if grep -v -q -E "^[[:space:]]*$|^(==[0-9]+==)?WARNING: AddressSanitizer failed to allocate" "$f"; then
        reports=$((reports + 1))
    else
        echo "(only refused allocations: allocator_may_return_null at work, not a finding)"
    fi
done
reports=$((reports + $(grep -c -E "ERROR: AddressSanitizer|runtime error:" "$LOG")))
echo "build $((build_done - start)) s, tests $((end - build_done)) s, total $((end - start)) s"
if [ "$rc" -ne 0 ] || [ "$reports" -ne 0 ]; then
    echo "sanitize: FAIL (pytest exit $rc, $reports sanitizer report(s))"
    exit 1
fi
echo "sanitize: PASS"
