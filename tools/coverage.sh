#!/usr/bin/env bash
# Line coverage of kvcache over the full test suite.
#
#   tools/coverage.sh            Python modules (kvcache/*.py, kvcache/integrations/*.py),
#                                measured against the installed (editable) package.
#   tools/coverage.sh --cython   the Cython core (kvcache/_core.pyx, kvcache/_attention.pxi)
#                                and the Python modules, from a linetrace build made in a
#                                temporary copy of the repository (setup.py patched there
#                                with KVCACHE_COVERAGE=1; see below).
#   tools/coverage.sh [--cython] -- ARGS   extra ARGS go to pytest (e.g. -k, -x, a test file)
#
# Needs: coverage >= 7.10 (pip install coverage), and for --cython Cython >= 3.0 and a C
# compiler.  Run from anywhere; it works from the repository root.  It leaves the working
# tree unchanged: data and reports go under build/coverage/ (ignored by git), the Cython
# build lives in a temporary directory that is removed on exit (KEEP_TMP=1 keeps it).
# Outputs: build/coverage/{python,cython}.txt (the report), .../html-{python,cython}/.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
RC="$ROOT/tools/coveragerc"
OUTDIR="$ROOT/build/coverage"

MODE=python
PYTEST_ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --cython) MODE=cython; shift ;;
        --python) MODE=python; shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        --) shift; PYTEST_ARGS=("$@"); break ;;
        *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
done

python -c 'import coverage, sys; v = tuple(map(int, coverage.__version__.split(".")[:2]));
sys.exit(0 if v >= (7, 10) else "coverage >= 7.10 is needed: pip install -U coverage")'
mkdir -p "$OUTDIR"

if [ "$MODE" = python ]; then
    data="$OUTDIR/python"
    rm -rf "$data" "$OUTDIR/html-python"; mkdir -p "$data"
    export COVERAGE_FILE="$data/.coverage"
    start=$(date +%s)
    # -p no:cacheprovider: no .pytest_cache in the tree.  The exit status of the
    # tests is kept: a failing suite gives a report but fails the script.
    set +e
    python -m coverage run --rcfile="$RC" -m pytest -p no:cacheprovider -q "${PYTEST_ARGS[@]}"
    status=$?
    set -e
    python -m coverage combine --rcfile="$RC" -q "$data"
    python -m coverage report --rcfile="$RC" | tee "$OUTDIR/python.txt"
    python -m coverage html --rcfile="$RC" -q -d "$OUTDIR/html-python"
    echo "python coverage: $(( $(date +%s) - start )) s; report in $OUTDIR/python.txt"
    exit $status
fi

# --- Cython: a linetrace build in a temporary copy --------------------------------------
python -c 'import Cython' 2>/dev/null || { echo "Cython is not installed" >&2; exit 1; }
TMP=$(mktemp -d "${TMPDIR:-/tmp}/kvcache-cov.XXXXXX")
if [ "${KEEP_TMP:-0}" != 1 ]; then trap 'rm -rf "$TMP"' EXIT; else echo "keeping $TMP"; fi
start=$(date +%s)

# The working tree as git sees it (tracked + untracked, not ignored): no build outputs,
# no stale kvcache/_core.c, so cythonize regenerates it with the linetrace directive.
git ls-files -z --cached --others --exclude-standard \
    | (cd "$ROOT" && tar --null -T - -cf -) | tar -xf - -C "$TMP"

# The switch proposed for setup.py (KVCACHE_COVERAGE=1), applied to the copy only
# unless setup.py already has it.
python - "$TMP/setup.py" <<'EOF'
import sys
path = sys.argv[1]
src = open(path).read()
if "KVCACHE_COVERAGE" not in src:
    edits = [
        ('NATIVE = os.environ.get("KVCACHE_NATIVE") == "1"\n',
         'NATIVE = os.environ.get("KVCACHE_NATIVE") == "1"\n'
         '# Coverage build (tools/coverage.sh --cython): line tracing, also inside nogil\n'
         '# blocks.  Much slower; never for a release build.\n'
         'COVERAGE = os.environ.get("KVCACHE_COVERAGE") == "1"\n'),
        ('define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],\n',
         'define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]\n'
         '        + ([("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")] if COVERAGE else []),\n'),
        ('    "embedsignature": True,\n}\n',
         '    "embedsignature": True,\n    "linetrace": COVERAGE,\n}\n'),
    ]
    for old, new in edits:
        if src.count(old) != 1:
            sys.exit(f"setup.py changed; cannot apply the coverage patch at: {old!r}")
        src = src.replace(old, new)
    open(path, "w").write(src)
EOF

cd "$TMP"
echo "building the linetrace core in $TMP ..."
KVCACHE_COVERAGE=1 python setup.py -q build_ext --inplace -j "$(nproc)" > build_ext.log 2>&1 \
    || { tail -40 build_ext.log >&2; exit 1; }
grep -q '__Pyx_TraceLine(' kvcache/_core.c \
    || { echo "the core was not built with linetrace" >&2; exit 1; }

# The Cython plugin on top of tools/coveragerc; paths are relative to the copy.
cat > "$TMP/.coveragerc-cython" <<EOF
[run]
plugins = Cython.Coverage
EOF
python - "$RC" "$TMP/.coveragerc-cython" <<'EOF'
import configparser, sys
base, out = sys.argv[1], sys.argv[2]
cp = configparser.ConfigParser(interpolation=None)
cp.read(base)
cp["run"]["plugins"] = "Cython.Coverage"
# The .so and the .pyx/.pxi it traces live in the copy, not in site-packages.
cp["run"]["source"] = "kvcache"
cp["run"].pop("source_pkgs", None)
# No measuring of plain subprocesses here: the plugin's warnings would reach the
# stderr that tests/test_attention.py's child-process checks read, and data from
# children started with a cleaned environment conflicts at combine time.
# (multiprocessing children, as bench's growth rows, are still measured.)
cp["run"].pop("patch", None)
with open(out, "w") as f:
    cp.write(f)
EOF

data="$TMP/covdata"; mkdir -p "$data"
export COVERAGE_FILE="$data/.coverage"
# The copy comes first on sys.path: the editable install's finder is consulted only
# after sys.path, so "import kvcache" loads the copy with the linetrace core.
export PYTHONPATH="$TMP${PYTHONPATH:+:$PYTHONPATH}"
python -c 'import kvcache._core as c, sys; sys.exit(0 if c.__file__.startswith(sys.argv[1]) else
           f"kvcache._core comes from {c.__file__}, not the copy")' "$TMP"
set +e
python -m coverage run --rcfile=.coveragerc-cython -m pytest -p no:cacheprovider -q \
    "${PYTEST_ARGS[@]}"
status=$?
set -e
python -m coverage combine --rcfile=.coveragerc-cython -q "$data"
rm -rf "$OUTDIR/html-cython"
python -m coverage report --rcfile=.coveragerc-cython | tee "$OUTDIR/cython.txt"
python -m coverage html --rcfile=.coveragerc-cython -q -d "$OUTDIR/html-cython"
echo "cython coverage: $(( $(date +%s) - start )) s; report in $OUTDIR/cython.txt"
exit $status
