#!/usr/bin/env bash
# The asv dashboard: benchmark results over the recent commits of main,
# published as HTML, opened in headless Chromium to check that the benchmark
# graphs render, and a screenshot saved.
#
#   bash tools/dashboard.sh [--commits N] [--rerun] [--timings]
#                                                     # the history (~3 min a commit here)
#   bash tools/dashboard.sh --ci                      # CI: this checkout only (~10-25 s)
#   bash tools/dashboard.sh --no-run                  # publish and check what results hold
#
# History (default): `asv run --quick` over the last N commits of main
# (default 3; a benchmark already measured on a commit in asv's virtualenv
# is skipped unless --rerun; with
# --timings asv takes its full repeats instead of --quick's single sample:
# figures for trends, several times longer), each built as a wheel (PEP 517)
# and installed in asv's virtualenv environment, as asv_benches/asv.conf.json
# says; the build requirements and numpy come from PyPI (pip's cache after the
# first time).  Benchmarks are the working tree's; one that fails on an older
# commit (a benchmark newer than the commit) is reported but does not fail
# the dashboard.
#
# --ci: `asv run --quick --python=same --set-commit-hash HEAD` on the update
# and metrics benchmarks, quick profile (KVCACHE_ASV_PROFILE=quick): the
# kvcache installed in the current Python stands for HEAD, no build; any
# failure fails.  Both then run `asv publish` and tools/dashboard_check.py
# (local copies of asv's JavaScript dependencies, a localhost server,
# headless Chromium, DOM checks, screenshot).
#
# In a copy that is not a git checkout (an unpacked sdist, a copied tree), a
# throwaway repository holding one commit of the tree's sources stands in
# for the checkout (asv keys every result by a commit): --ci records under
# its hash, and history mode measures that one commit.
#
# The screenshot goes to $KVCACHE_ARTIFACTS/dashboard.png, else
# ci-artifacts/dashboard.png (gitignored).  Without Chromium the script
# installs it (apt-get, as root); where it cannot, it says so and skips the
# render check and the screenshot only.  View the dashboard afterwards with
# `cd asv_benches && asv preview` (http://127.0.0.1:8080).
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd -P)"
self="$repo/tools/$(basename "$0")"
cd "$repo/asv_benches" || exit 1

mode=history
commits=3
rerun=0
quick=(--quick)
while [ $# -gt 0 ]; do
    case "$1" in
        --ci) mode=ci ;;
        --no-run) mode=none ;;
        --commits) commits="$2"; shift ;;
        --commits=*) commits="${1#--commits=}" ;;
        --rerun) rerun=1 ;;
        --timings) quick=() ;;
        -h|--help) sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$self"; exit 0 ;;
        *) echo "dashboard: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
say() { echo "dashboard: $*"; }
start=$SECONDS

if ! command -v asv >/dev/null 2>&1; then
    say "asv is not installed (pip install 'kvcache[bench]')" >&2
    exit 1
fi
asv machine --yes >/dev/null || exit 1

temps=()
trap 'rm -rf "${temps[@]}"' EXIT
# The repository asv reads commits from: this checkout, or a stand-in.
git_src="$repo"
conf=()
if [ "$(git -C "$repo" rev-parse --show-toplevel 2>/dev/null)" != "$repo" ]; then
    if ! command -v git >/dev/null 2>&1; then
        say "not a git checkout, and no git to make a stand-in repository" >&2
        exit 1
    fi
    git_src="$(mktemp -d)"
    temps+=("$git_src")
    git -C "$git_src" init -q && git -C "$git_src" symbolic-ref HEAD refs/heads/main
    # the sources a wheel is built from, not what builds or runs leave here
    printf '%s\n' '*.so' '*.o' '__pycache__/' '*.egg-info/' 'kvcache/_core.c' \
        'kvcache/_core.html' >> "$git_src/.git/info/exclude"
    paths=()
    for p in pyproject.toml setup.py MANIFEST.in README.md kvcache src include; do
        [ -e "$repo/$p" ] && paths+=("$p")
    done
    # Dated by the newest source file: the same tree gives the same commit
    # hash run after run, so results recorded earlier stay on their commit.
    newest="$(cd "$repo" && find "${paths[@]}" -type f -printf '%T@\n' | sort -n | tail -1)"
    export GIT_AUTHOR_DATE="@${newest%.*} +0000" GIT_COMMITTER_DATE="@${newest%.*} +0000"
    if ! git -C "$repo" --git-dir="$git_src/.git" --work-tree="$repo" add -- "${paths[@]}" ||
       ! git -C "$repo" --git-dir="$git_src/.git" --work-tree="$repo" -c user.name=dashboard \
            -c user.email=dashboard@localhost commit -q -m "the tree of $repo (no git checkout)"
    then
        say "FAILED: could not make a stand-in repository of $repo" >&2
        exit 1
    fi
    # beside asv.conf.json, so that its results/html/env folders stay where they are
    stand_in_conf="$repo/asv_benches/.asv-stand-in.json"
    temps+=("$stand_in_conf")
    python3 - "$repo/asv_benches/asv.conf.json" "$stand_in_conf" "$git_src" <<'PY' || exit 1
import json, sys
conf = json.load(open(sys.argv[1]))
conf["repo"] = sys.argv[3]
json.dump(conf, open(sys.argv[2], "w"), indent=4)
PY
    conf=(--config "$stand_in_conf")
    say "$repo is not a git checkout: a stand-in repository holds its tree as one commit"
fi

case "$mode" in
    ci)
        export KVCACHE_ASV_PROFILE="${KVCACHE_ASV_PROFILE:-quick}"
        head="$(git -C "$git_src" rev-parse HEAD)" || exit 1
        say "asv run --python=same --quick, HEAD ${head:0:8}, update + metrics benchmarks"
        if ! asv run "${conf[@]}" --python=same --quick --show-stderr --set-commit-hash "$head" \
                --bench '^update\.' --bench '^metrics\.'; then
            say "FAILED: asv run" >&2
            exit 1
        fi
        pages=(update.Update.track_update metrics.MetricsOverhead.track_decode_step)
        ;;
    history)
        hashes="$(mktemp)"
        temps+=("$hashes")
        git -C "$git_src" rev-list --first-parent -n "$commits" main > "$hashes" || exit 1
        # Per environment and benchmark: a commit that --ci measured (the
        # update and metrics benchmarks, in the current Python) still gets
        # every benchmark here; --skip-existing-commits would skip it whole,
        # leaving the other pages without data.
        skip=(--skip-existing)
        [ "$rerun" -eq 1 ] && skip=()
        say "asv run ${quick[*]} over the last $commits commits of main (virtualenv builds)"
        asv run "${conf[@]}" "${quick[@]}" --show-stderr "${skip[@]}" "HASHFILE:$hashes"
        rc=$?
        if [ "$rc" -eq 2 ]; then
            say "some benchmarks failed on some commits (see above; e.g. a benchmark newer" \
                "than the commit): they are missing from those commits' graphs"
        elif [ "$rc" -ne 0 ]; then
            say "FAILED: asv run exited with $rc" >&2
            exit 1
        fi
        pages=(update.Update.track_update growth.Growth.track_slowest_update_us
               compression.Compression.track_ratio attention.Attention.time_attention
               metrics.MetricsOverhead.track_decode_step)
        ;;
    none)
        pages=(update.Update.track_update)
        ;;
esac

if ! asv publish "${conf[@]}"; then
    say "FAILED: asv publish" >&2
    exit 1
fi
say "published asv_benches/html ($((SECONDS - start)) s so far)"

# Headless Chromium and the JavaScript libraries asv's pages load, from
# Debian's packages (installed where missing, as root).
packages=()
command -v chromium >/dev/null 2>&1 || packages+=(chromium)
[ -e /usr/share/javascript/jquery-flot/jquery.flot.js ] ||
    packages+=(libjs-jquery libjs-jquery-flot libjs-bootstrap libjs-jquery-stupidtable
               node-blueimp-md5)
if [ ${#packages[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing ${packages[*]} (apt-get)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q "${packages[@]}" >/dev/null 2>&1 ||
            { apt-get update -q >/dev/null 2>&1 &&
              apt-get install -y -q "${packages[@]}" >/dev/null 2>&1; } ||
            say "apt-get install ${packages[*]} failed"
    else
        say "missing ${packages[*]} and not root: cannot install them"
    fi
fi
if ! command -v chromium >/dev/null 2>&1; then
    say "SKIPPED the render check and the screenshot: no Chromium" \
        "(apt-get install chromium as root); the HTML is published in asv_benches/html"
    exit 0
fi

shot="${KVCACHE_ARTIFACTS:-$repo/ci-artifacts}/dashboard.png"
args=()
for p in "${pages[@]}"; do args+=(--bench "$p"); done
python3 "$repo/tools/dashboard_check.py" --html "$repo/asv_benches/html" \
    --screenshot "$shot" "${args[@]}"
rc=$?
if [ "$rc" -ne 0 ]; then
    say "FAILED (status $rc) after $((SECONDS - start)) s" >&2
    exit 1
fi
say "ok in $((SECONDS - start)) s; view: cd asv_benches && asv preview"
