"""Atomic writes clear what dead writers left (kvcache/atomic_files.py).

A writer killed between creating its temporary and renaming it leaves the
temporary behind.  The next writer of the same target on the same host
removes those of processes that no longer run, and never a running
process's, another host's, or anything else in the directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np

from kvcache import KVCache
from kvcache.atomic_files import _HOST, clear_dead_temporaries, write_atomically


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _temp(directory, target: str, pid: int, host: str = _HOST) -> str:
    name = f".{target}.{host}.{pid}.abc123_x.tmp"
    with open(os.path.join(directory, name), "wb") as f:
        f.write(b"half a file")
    return name


def test_dead_writers_temporaries_go_live_ones_stay(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = _temp(tmp_path, "c.kvc", _dead_pid())
        live_child = _temp(tmp_path, "c.kvc", sleeper.pid)
        live_self = _temp(tmp_path, "c.kvc", os.getpid())
        other_host = _temp(tmp_path, "c.kvc", _dead_pid(), host="elsewhere")
        other_target = _temp(tmp_path, "d.kvc", _dead_pid())
        (tmp_path / "unrelated.tmp").write_bytes(b"x")
        write_atomically(tmp_path / "c.kvc", [b"new ", b"file"])
        names = set(os.listdir(tmp_path))
        assert dead not in names
        assert {live_child, live_self, other_host, other_target, "unrelated.tmp"} <= names
        assert (tmp_path / "c.kvc").read_bytes() == b"new file"
        # the other target's dead temporary goes when that target is written
        assert clear_dead_temporaries(tmp_path / "d.kvc") == [str(tmp_path / other_target)]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_new_file_private_replaced_file_keeps_its_mode(tmp_path):
    path = tmp_path / "c.kvc"
    write_atomically(path, [b"a"])
    assert path.stat().st_mode & 0o777 == 0o600
    path.chmod(0o640)
    write_atomically(path, [b"b"])
    assert path.stat().st_mode & 0o777 == 0o640


_SAVER = textwrap.dedent("""
    import sys, numpy as np
    from kvcache import KVCache
    c = KVCache(8, 4, 64, max_seq_len=4096, dtype="float32")
    k = np.random.default_rng(1).standard_normal((1, 4, 4000, 64)).astype(np.float32)
    for li in range(8):
        c.update(li, k, k, 4000)
    print("ready", flush=True)
    while True:
        c.save(sys.argv[1])
""")


def test_sigkilled_save_leaves_a_temporary_the_next_save_removes(tmp_path):
    """A real writer (a 64 MiB save in a loop) SIGKILLed while its temporary
    exists: the temporary stays until the next save of the same target,
    which removes it; the target still loads."""
    path = tmp_path / "c.kvc"
    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    caught = None
    for _ in range(10):
        proc = subprocess.Popen([sys.executable, str(script), str(path)], cwd=tmp_path,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            temps = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
            if temps:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.001)
        proc.kill()
        proc.wait()
        proc.stdout.close()
        left = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
        if left:
            caught = left
            break
    assert caught, "never killed the writer while its temporary existed"
    assert all(f".{proc.pid}." in n for n in caught)
    small = KVCache(1, 1, 8, max_seq_len=16)
    small.update(0, np.ones((1, 1, 3, 8), np.float16), np.ones((1, 1, 3, 8), np.float16), 3)
    small.save(path)
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []
    assert KVCache.load(path).seq_len(0) == 3
