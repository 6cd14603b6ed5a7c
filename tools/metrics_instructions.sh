#!/usr/bin/env bash
# Instructions per one-token update with metrics on and off, counted by
# valgrind's callgrind: unlike wall time, the count repeats exactly on a busy
# machine, so it resolves a ~1% difference that timing noise hides.
# Usage: tools/metrics_instructions.sh [steps]   (needs valgrind; ~2 minutes)
set -euo pipefail
steps=${1:-2000}
py=$(python -c 'import sys; print(sys.executable)')   # not a pyenv shim: callgrind must see python
tmp=$(mktemp -d)
cat > "$tmp/run.py" <<'PY'
import sys
import numpy as np
import kvcache
flag, steps = sys.argv[1] == "on", int(sys.argv[2])
L, H, D, ctx = 30, 3, 64, 1024
c = kvcache.KVCache(L, H, D, max_seq_len=ctx + steps + 64, metrics=flag)
pre = np.random.default_rng(0).standard_normal((1, H, ctx, D)).astype(np.float16)
k = np.ascontiguousarray(pre[:, :, :1])
for layer in range(L):
    c.update(layer, pre, pre, ctx)
upd = c.update
for s in range(steps):
    for layer in range(L):
        upd(layer, k, k, ctx + s + 1)
PY
count() {  # inclusive instructions of KVStore.update over a run
  PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file="$tmp/cg" \
    "$py" "$tmp/run.py" "$1" "$2" >/dev/null 2>&1
  callgrind_annotate --inclusive=yes --threshold=100 "$tmp/cg" 2>/dev/null \
    | grep -E "KVStore_[0-9]*update" | head -1 | awk '{gsub(",", "", $1); print $1}'
}
calls=$((steps * 30))
on=$(( $(count on "$steps") - $(count on 0) ))
off=$(( $(count off "$steps") - $(count off 0) ))
python - "$on" "$off" "$calls" <<'PY'
import sys
on, off, calls = (int(x) for x in sys.argv[1:])
print(f"instructions per update: metrics on {on / calls:.1f}, off {off / calls:.1f}, "
      f"overhead {on / calls - off / calls:.1f} ({(on - off) / off:.2%})")
PY
rm -rf "$tmp"
