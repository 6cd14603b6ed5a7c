#!/usr/bin/env bash
# Smoke run of every asv benchmark, so that a broken benchmark fails CI.
#
#   bash tools/asv_smoke.sh [extra asv run options, e.g. --bench update]
#
# `asv run --python=same --quick` in asv_benches/: every benchmark (every
# parameter combination) runs once, against the kvcache installed in the
# current Python, with the quick profile's grids (KVCACHE_ASV_PROFILE=quick,
# see asv_benches/benchmarks/_common.py; set it to `full` for the full
# grids).  Nothing is saved (--dry-run).  Fails when asv fails (it exits 2 if
# any benchmark failed), when a benchmark prints "failed", or when one is
# skipped (n/a) other than an attention kernel backend this CPU lacks
# (ASV_SMOKE_ALLOW_SKIP, a regex over benchmark names): a benchmark must not
# skip itself into green.  ~2 min on 2 cores.
set -uo pipefail
cd "$(dirname "$0")/../asv_benches" || exit 1

if ! command -v asv >/dev/null 2>&1; then
    echo "asv_smoke: asv is not installed (pip install 'kvcache[bench]')" >&2
    exit 1
fi
export KVCACHE_ASV_PROFILE="${KVCACHE_ASV_PROFILE:-quick}"
allow_skip="${ASV_SMOKE_ALLOW_SKIP:-^attention\.Attention\.time_attention$}"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT

# asv wants a machine description (~/.asv-machine.json); --yes takes the defaults.
asv machine --yes >/dev/null || exit 1

start=$SECONDS
asv run --python=same --quick --show-stderr --dry-run "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
elapsed=$((SECONDS - start))

status=0
if [ "$rc" -ne 0 ]; then
    echo "asv_smoke: asv run exited with status $rc" >&2
    status=1
fi
# Benchmark lines look like "[ 47.73%] ··· update.Update.track_update   ok"
# (status ok, failed or n/a, or the value of one without parameters); a parameter combination that failed or was
# skipped shows "failed" / "n/a" as a cell of the table under it (cells are
# separated by two or more spaces).
ALLOW_SKIP="$allow_skip" python3 - "$log" <<'PY' || status=1
import os, re, sys

# status: ok / failed / n/a, or the value of a benchmark without parameters
head = re.compile(r"^\[ *[0-9.]+%\] ·{3} ([^\s=]\S*\.\S+)\s{2,}(\S.*?)\s*$")
cell = re.compile(r"(?:^|\s{2})(failed|n/a)(?:\s{2}|\s*$)")
allow = re.compile(os.environ["ALLOW_SKIP"])
ran, failed, skipped = [], set(), set()
name = None
for line in open(sys.argv[1], encoding="utf-8", errors="replace"):
    m = head.match(line)
    if m:
        name, state = m.groups()
        ran.append(name)
        if state == "failed":
            failed.add(name)
        elif state in ("n/a", "skipped"):
            skipped.add(name)
        continue
    c = cell.search(line) if name else None
    if c:
        (failed if c.group(1) == "failed" else skipped).add(name)
bad_skips = sorted(n for n in skipped if not allow.search(n))
for title, names in (("failed benchmarks", sorted(failed)),
                     ("benchmarks skipped (n/a), not allowed by ASV_SMOKE_ALLOW_SKIP",
                      bad_skips)):
    if names:
        print(f"asv_smoke: {title}:", *names, sep="\n  ", file=sys.stderr)
if not ran:
    print("asv_smoke: no benchmark ran", file=sys.stderr)
print(f"asv_smoke: {len(ran)} benchmarks reported", file=sys.stderr)
sys.exit(1 if failed or bad_skips or not ran else 0)
PY
if [ "$status" -eq 0 ]; then
    echo "asv_smoke: ok ($KVCACHE_ASV_PROFILE profile) in ${elapsed} s"
fi
exit "$status"
