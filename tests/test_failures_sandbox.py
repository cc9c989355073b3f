"""The sandbox's failure paths with real processes: a parent killed mid-query leaves no process behind and no
traceback, and a script without a `__main__` guard gets one error instead of a respawn loop."""

import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sqlr1.sandbox import Sandbox

ROOT = Path(__file__).resolve().parents[1]
GONE_WITHIN = 5.0  # seconds; typically ~0.1 s, but this machine is shared by many processes
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

RUNAWAY = {  # queries that run for hours: one the progress handler could stop (but the deadline is far), one it cannot
    "recursive": "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r) SELECT count(*) FROM r",
    "c_level": "SELECT instr(hex(zeroblob(5000000)), hex(zeroblob(2500000)) || 'x')",
}

PARENT = """
import sys
from sqlr1.sandbox import Sandbox

if __name__ == "__main__":
    with Sandbox(num_workers=2, timeout=600) as sandbox:  # one worker runs the query, the other stays idle
        print("running", flush=True)
        sandbox.execute_many([(sys.argv[1], sys.argv[2])])
"""

UNGUARDED = """
import sys
from sqlr1.sandbox import Sandbox

sandbox = Sandbox(num_workers=2, timeout=5)
print(sandbox.execute_many([(sys.argv[1], "SELECT 1")]))
"""


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("db") / "t.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x INTEGER)")
    conn.commit()
    conn.close()
    return path


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running or sleeping; a zombie (dead, waiting to be reaped by whoever adopted it) does not count."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how, query", [(signal.SIGKILL, "recursive"), (signal.SIGTERM, "c_level")])
def test_a_killed_parent_leaves_no_process_and_no_traceback(db, tmp_path, how, query):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "w") as err:
        parent = subprocess.Popen([sys.executable, str(script), str(db), RUNAWAY[query]], stdout=subprocess.PIPE,
                                  stderr=err, text=True, env=ENV, cwd=tmp_path)
    left: list[int] = []
    try:
        assert parent.stdout.readline() == "running\n", stderr.read_text()
        time.sleep(0.5)  # the query is under way
        family = descendants(parent.pid)  # resource tracker, fork server, two workers
        assert len(family) >= 4, family
        parent.send_signal(how)
        parent.wait(timeout=30)
        deadline = time.monotonic() + GONE_WITHIN
        while (left := [p for p in family if alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not left, f"still running {GONE_WITHIN} s after the parent died: {left}"
        assert "Traceback" not in stderr.read_text(), stderr.read_text()
    finally:
        for pid in left:  # what a failing run left behind, so that it does not burn the CPU for hours
            os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_a_script_without_main_guard_gets_one_error(db, tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED)
    proc = subprocess.Popen([sys.executable, str(script), str(db)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, cwd=tmp_path, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:  # the failure mode: workers re-run the script, die, and are respawned forever
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the script did not stop: the pool keeps respawning workers that die at start-up")
    assert proc.returncode != 0
    assert 'if __name__ == "__main__":' in err and "died while starting" in err
    assert err.count("Traceback") == 1, err  # the parent's; the workers say nothing


def test_numbers_that_cannot_work_are_refused_by_name(db):
    for kwargs, name in [(dict(timeout=math.nan), "timeout"), (dict(timeout=0), "timeout"),
                         (dict(timeout=math.inf), "timeout"), (dict(grace=math.nan), "grace"),
                         (dict(num_workers=0), "num_workers"), (dict(memory_mb=8), "memory_mb")]:
        with pytest.raises(ValueError, match=f"Sandbox: {name}="):
            Sandbox(num_workers=kwargs.pop("num_workers", 1), **kwargs)
    with Sandbox(num_workers=1) as sandbox:
        for timeout in (math.nan, 0.0, -1.0, math.inf):
            with pytest.raises(ValueError, match="timeout"):
                sandbox.execute_many([(db, "SELECT 1")], timeout=timeout)
        assert sandbox.execute_many([(db, "SELECT 1")])[0].rows == [(1,)]
