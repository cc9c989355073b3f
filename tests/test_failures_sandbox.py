"""The sandbox's failure paths with real processes: a parent killed mid-query leaves no process behind and no
traceback, a script without a `__main__` guard gets one error instead of a respawn loop, and databases that another
process writes (WAL commits not yet checkpointed, a writer holding a transaction, a writer that crashed, a WAL file in
a folder the reader cannot write) are read in their committed state or refused by name, never stale or half-written."""

import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sqlr1.data import schema_text, table_names
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
from sqlr1.data import schema_text, table_names
from sqlr1.sandbox import Sandbox

if __name__ == "__main__":
    with Sandbox(num_workers=2, timeout=600) as sandbox:  # one worker runs the query, the other stays idle
        print("running", flush=True)
        sandbox.execute_many([(sys.argv[1], sys.argv[2])])
"""

UNGUARDED = """
import sys
from sqlr1.data import schema_text, table_names
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


# ----------------------------------------------------------------------------------------- databases being written

WRITER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
for line in sys.stdin:
    try:
        conn.execute(line)
        print("ok", flush=True)
    except sqlite3.Error as e:
        print(f"error: {e}", flush=True)
"""
SPILL = [  # an uncommitted transaction too big for a 10-page cache: its pages reach the database file itself
    "PRAGMA cache_size = 10", "BEGIN IMMEDIATE", "DELETE FROM t", "INSERT INTO t VALUES (-1)", "CREATE TABLE pad (b)",
    "INSERT INTO pad SELECT randomblob(4000) FROM (WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c "
    "WHERE i < 200) SELECT i FROM c)"]
COUNT = "SELECT count(*), min(x) FROM t"


class Writer:
    """Another process with its own connection to `db`, running one statement per line, in order (so it can hold
    a transaction open between calls)."""

    def __init__(self, db: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def run(self, *statements: str) -> None:
        for sql in statements:
            self.proc.stdin.write(sql + "\n")
            self.proc.stdin.flush()
            reply = self.proc.stdout.readline()
            assert reply == "ok\n", (sql, reply)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


def ten_rows(path: Path, journal_mode: str) -> Path:
    """t(x) holding 0..9, plus a row of invalid UTF-8 in bad(txt); closed cleanly (a WAL file is checkpointed)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA journal_mode = {journal_mode}")
    conn.execute("CREATE TABLE t (x INTEGER)")
    conn.execute("INSERT INTO t SELECT value FROM json_each('[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]')")
    conn.execute("CREATE TABLE bad (txt TEXT)")
    conn.execute("INSERT INTO bad VALUES (CAST(x'fffe41' AS TEXT))")
    conn.close()
    return path


@pytest.fixture
def writer():
    writers = []

    def start(db: Path) -> Writer:
        writers.append(Writer(db))
        return writers[-1]

    yield start
    for w in writers:
        w.close()


def test_wal_commits_not_yet_checkpointed_are_read(tmp_path, writer):
    """A WAL database whose writer keeps it open: 15 committed rows and a table live only in the -wal file, and an
    uncommitted transaction is open. Queries and the prompt's schema read the commits, not the open transaction."""
    db = ten_rows(tmp_path / "wal.sqlite", "wal")
    w = writer(db)
    w.run("PRAGMA wal_autocheckpoint = 0", "INSERT INTO t SELECT x + 10 FROM t", "INSERT INTO t SELECT 20 FROM t LIMIT 5",
          "CREATE TABLE late (y)", "INSERT INTO late VALUES ('committed')")
    w.run("BEGIN IMMEDIATE", "INSERT INTO t SELECT -x FROM t")  # a live writer's open transaction: not to be seen
    assert Path(f"{db}-wal").stat().st_size > 0  # the 15 rows and the table are committed in the WAL file only
    with Sandbox(num_workers=1, timeout=2.0) as sandbox:
        start = time.monotonic()
        count, late = sandbox.execute_many([(db, COUNT), (db, "SELECT y FROM late")])
        assert time.monotonic() - start < 1.0  # a WAL reader does not wait for the writer
        assert count.rows == [(25, 0)] and late.rows == [("committed",)], (count, late)
        assert "late" in table_names(db) and "CREATE TABLE late" in schema_text(db)  # the prompt's schema agrees
        w.run("COMMIT")
        assert sandbox.execute_many([(db, COUNT)])[0].rows == [(50, -20)]


@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
def test_a_kept_connection_reads_each_new_commit(tmp_path, writer, journal_mode):
    """A worker keeps its connections open across queries and calls; each query still reads the latest commit,
    also after a query that stopped early (row_limit, an undecodable row, a row cap)."""
    db = ten_rows(tmp_path / f"{journal_mode}.sqlite", journal_mode)
    w = writer(db)
    w.run("PRAGMA wal_autocheckpoint = 0")
    with Sandbox(num_workers=1, timeout=2.0, max_rows=5) as sandbox:
        for k in range(3):
            first = sandbox.execute_many([(db, "SELECT x FROM t")], row_limit=1)[0]
            stopped = sandbox.execute_many([(db, "SELECT x FROM t"), (db, "SELECT txt FROM bad")])
            [count] = sandbox.execute_many([(db, COUNT)])
            assert first.truncated and [r.status for r in stopped] == ["error", "error"]
            assert count.rows == [(10 + 5 * k, 0)], (k, count)
            w.run("INSERT INTO t SELECT x + 100 FROM t LIMIT 5")


def test_a_writer_holding_a_transaction_is_waited_out_never_read_half_done(tmp_path, writer):
    """Rollback-journal database: the writer's uncommitted pages are already in the file. A query waits for the
    commit up to its deadline, then reads the committed state; past the deadline it is a timeout naming the file."""
    db = ten_rows(tmp_path / "live.sqlite", "delete")
    w = writer(db)
    w.run(*SPILL)
    with Sandbox(num_workers=1, timeout=5.0) as sandbox:
        [locked] = sandbox.execute_many([(db, COUNT)], timeout=0.5)
        assert locked.status == "timeout" and locked.rows == [], locked
        assert str(db) in locked.error and "locked" in locked.error
        threading.Timer(0.3, w.run, args=("INSERT INTO t VALUES (-2)", "COMMIT")).start()
        start = time.monotonic()
        [after] = sandbox.execute_many([(db, COUNT)])
        assert after.rows == [(2, -2)] and time.monotonic() - start >= 0.3, after


def test_a_crashed_writers_hot_journal_is_refused_by_name(tmp_path, writer):
    db = ten_rows(tmp_path / "crashed.sqlite", "delete")
    w = writer(db)
    w.run(*SPILL)
    w.proc.kill()  # the writer dies mid-transaction: its half-written pages stay in the file, the journal beside it
    w.proc.wait()
    with Sandbox(num_workers=1, timeout=2.0) as sandbox:
        [hot] = sandbox.execute_many([(db, COUNT)])
        assert hot.status == "error" and hot.rows == [], hot
        assert f"{db}-journal" in hot.error and "write access" in hot.error
        with pytest.raises(ValueError, match=f"{db}-journal"):
            schema_text(db)
        sqlite3.connect(db).execute("PRAGMA quick_check").close()  # what the message says: this rolls back
        assert sandbox.execute_many([(db, COUNT)])[0].rows == [(10, 0)]


READ_ONLY_FOLDER = """
import ctypes, os, sys

if os.geteuid() == 0 and "DROPPED" not in os.environ:  # root ignores permissions: drop that power, start again
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, out of the bounding set: gone after exec
        if ctypes.CDLL(None).prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            sys.exit("cannot drop capabilities")
    os.environ["DROPPED"] = "1"
    os.execv(sys.executable, sys.orig_argv)

from sqlr1.data import schema_text
from sqlr1.sandbox import Sandbox

if __name__ == "__main__":
    plain, wal = sys.argv[1:]
    with Sandbox(num_workers=1, timeout=2.0) as sandbox:
        ok, refused = sandbox.execute_many([(plain, "SELECT count(*) FROM t"), (wal, "SELECT count(*) FROM t")])
    print(ok.rows)
    print(refused.status, refused.error)
    try:
        schema_text(wal)
    except ValueError as e:
        print(e)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux permissions and capabilities")
def test_a_read_only_folder_reads_rollback_databases_and_names_a_wal_one(tmp_path):
    """Spider / BIRD copies (rollback journal) read fine from a read-only file in a read-only folder. A WAL database
    there cannot be read in its committed state (SQLite must create its -shm file): refused, naming the file. As
    root, the reading process first gives up the capabilities that ignore file permissions."""
    folder = tmp_path / "ro"
    folder.mkdir()
    plain, wal = ten_rows(folder / "plain.sqlite", "delete"), ten_rows(folder / "wal.sqlite", "wal")
    for path in (plain, wal):
        path.chmod(0o444)
    folder.chmod(0o555)
    try:
        proc = subprocess.run([sys.executable, "-c", READ_ONLY_FOLDER, str(plain), str(wal)], capture_output=True,
                              text=True, env=ENV, cwd=tmp_path, timeout=120)
    finally:
        folder.chmod(0o755)  # so that pytest can remove it
    if "cannot drop capabilities" in proc.stderr:
        pytest.skip("running as root without CAP_SETPCAP: file permissions cannot be made to apply")
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(folder)) == ["plain.sqlite", "wal.sqlite"]
    ok, refused, schema = proc.stdout.splitlines()
    assert ok == "[(10,)]"
    assert refused.startswith(f"error database {wal} is in WAL mode") and "journal_mode=DELETE" in refused
    assert schema.startswith(f"database {wal} is in WAL mode")


def test_a_writer_waits_for_one_query_not_for_a_whole_chunk(tmp_path, writer):
    """Queries in a row on one database share a read transaction, for READ_SPAN seconds at most: a writer of a
    rollback-journal database (whose commit needs every reader gone) waits for about one query, not for the chunk.
    The writer's own lock retries add up to 25 ms."""
    db = ten_rows(tmp_path / "busy.sqlite", "delete")
    slow = ("SELECT count(*) FROM t, (WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < {n}) "
            "SELECT i FROM c)")
    w = writer(db)
    with Sandbox(num_workers=1, timeout=30.0) as sandbox:

        def query_time(n: int) -> float:
            start = time.monotonic()
            sandbox.execute_many([(db, slow.format(n=n))])
            return time.monotonic() - start

        n = 20_000
        n = int(n * 0.05 / query_time(n))  # a query that reads t for about 50 ms on this machine
        took = query_time(n)
        reader = threading.Thread(target=sandbox.execute_many, args=([(db, slow.format(n=n))] * 24,))
        reader.start()  # a first chunk of 12 queries
        time.sleep(2 * took)
        start = time.monotonic()
        w.run("INSERT INTO t VALUES (10)")
        waited = time.monotonic() - start
        reader.join()
    assert waited < 4 * took, (waited, took)  # a transaction for the whole chunk: about 10 x took
