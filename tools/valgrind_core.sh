#!/usr/bin/env bash
# valgrind_core.sh -- run a core subset of the tests under valgrind memcheck,
# against the regular (installed / in-place, -O3) build of kvcache.
#
# What runs: see TESTS below (overridable: pass pytest arguments to replace
# the default selection).  memcheck slows Python ~30-50x, so the subset is
# the tests that drive the C core through its public entry points with
# fixed, small inputs: scenarios (append/compress/attend end to end), bad
# input (every rejected argument must leave the cache untouched -- the error
# paths are where C code most often frees twice or reads past a check), and
# the attention kernel tests, minus the hypothesis properties, threads,
# the env_ tests (children not traced) and the real-data / every-geometry sweeps (same code paths again, many times over).
# HYPOTHESIS_PROFILE=dev keeps any remaining hypothesis test small.
#
# Why KVCACHE_BACKEND=avx2: the core picks its attention/codec kernel at
# import from cpuid.  valgrind 3.19 cannot execute AVX-512 instructions (it
# would die with SIGILL / "unhandled instruction"); under valgrind cpuid
# reports the CPU valgrind emulates (AVX2, no AVX-512), so the import-time
# choice is already avx2, but the variable makes that explicit and safe
# against a valgrind whose cpuid passes more through.  Tests that loop over
# kvcache._core.available_backends() then cover avx2 and scalar (the
# avx512 variant is checked by tools/sanitize.sh and tools/aarch64_check.sh).
# Set KVCACHE_DISABLE_SIMD=1 yourself to run only the scalar kernels.
#
# Flags: --error-exitcode=1 makes any memcheck error fail the run;
# --leak-check=full --errors-for-leak-kinds=definite counts only *definite*
# leaks as errors (CPython leaves "possibly lost"/"still reachable" memory at
# exit by design).  PYTHONMALLOC=malloc sends every Python allocation to the
# system malloc memcheck tracks (pymalloc's arenas would hide overruns and
# produce false "uninitialised" reports).  Suppressions: valgrind's default
# set, Debian's python3.supp where present, and tools/valgrind-python.supp
# (reports whose top frame is inside libpython or ld.so; see that file).
#
# The real python binary is used (sys.executable), not a pyenv shim script:
# valgrind would otherwise trace bash running the shim.
#
# Usage, from anywhere:  bash tools/valgrind_core.sh [pytest args]
# Environment: PYTHON (default python3), VALGRIND (default valgrind),
#   VALGRIND_EXTRA (extra valgrind options, e.g. --gen-suppressions=all).
# Exit status: 0 PASS; non-zero on a failing test or any memcheck error.
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=$("${PYTHON:-python3}" -c 'import sys; print(sys.executable)')
VALGRIND=${VALGRIND:-valgrind}
command -v "$VALGRIND" >/dev/null || { echo "valgrind_core: FAIL (no valgrind)"; exit 2; }

TESTS=(tests/test_scenarios.py tests/test_bad_input.py tests/test_attention.py
       tests/test_fileformat.py tests/test_fuzz_loader.py
       -k "not property and not real_data and not backend_equals_scalar and not env_ and not adaptive_real_data and not compressed_matches_dequantized and not threads and not killed_writer and not leak_nothing")
[ $# -gt 0 ] && TESTS=("$@")

SUPP=(--suppressions="$REPO/tools/valgrind-python.supp")
for f in /usr/lib/valgrind/python3.supp /usr/lib/valgrind/debian.supp; do
    [ -f "$f" ] && SUPP+=(--suppressions="$f")
done

export PYTHONMALLOC=malloc
export KVCACHE_BACKEND=${KVCACHE_BACKEND:-avx2}
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-dev}
export KVCACHE_FUZZ_FILES=${KVCACHE_FUZZ_FILES:-2000}   # mutated save files (loader fuzzer)
export PYTHONDONTWRITEBYTECODE=1

LOG=$(mktemp "${TMPDIR:-/tmp}/valgrind_core.XXXXXX.log")
echo "python: $PY"
echo "kvcache._core: $(cd / && "$PY" -c 'import kvcache._core as c; print(c.__file__)')"
echo "valgrind log: $LOG"
start=$(date +%s)
cd "$REPO" || exit 2
# shellcheck disable=SC2086
"$VALGRIND" --tool=memcheck --error-exitcode=1 --leak-check=full \
    --errors-for-leak-kinds=definite --show-leak-kinds=definite \
    --num-callers=30 "${SUPP[@]}" --log-file="$LOG" ${VALGRIND_EXTRA:-} \
    "$PY" -m pytest -p no:cacheprovider -q "${TESTS[@]}"
rc=$?
end=$(date +%s)

errors=$(sed -n 's/.*ERROR SUMMARY: \([0-9]*\) errors.*/\1/p' "$LOG" | tail -1)
echo "--- memcheck ($((end - start)) s) ---"
grep -E "ERROR SUMMARY|definitely lost|indirectly lost" "$LOG" | sed 's/^==[0-9]*== //'
if [ "$rc" -ne 0 ] || [ "${errors:-1}" != 0 ]; then
    # show the reports themselves (not the suppressed ones)
    grep -v -E "^==[0-9]+== *$" "$LOG" | grep -B2 -A30 -E "Invalid|uninitialised|definitely lost in" | head -200
    echo "valgrind_core: FAIL (exit $rc, ${errors:-?} memcheck error(s); full log $LOG)"
    exit 1
fi
rm -f "$LOG"
echo "valgrind_core: PASS"
