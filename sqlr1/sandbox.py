"""Execute untrusted SQL read-only, in parallel, with real deadlines.

Every reward and every evaluation number comes from running model-written SQL against SQLite databases,
thousands of times per training step. `Sandbox` is a pool of worker processes that does this safely:

* read-only and contained: databases are opened with the URI `mode=ro`, `PRAGMA query_only`, no attached databases
  (`SQLITE_LIMIT_ATTACHED = 0`, which also stops `VACUUM INTO`), extension loading off, and an authorizer that
  allows only SELECT, column reads, recursive CTEs, functions other than `load_extension` and `fts3_tokenizer`, and a
  few schema-reading pragmas. Python's sqlite3 runs one statement at most: `SELECT 1; DROP TABLE t` is an error and
  nothing runs. Text that is not valid UTF-8 is an error, or with text_errors="ignore" (Spider's test-suite rule)
  loses its undecodable bytes.
* committed state only: no `immutable=1`, so SQLite's locks and WAL index let each query read the database as
  committed at some moment during its `execute_many` call, never a writer's unfinished pages. A query waits for a
  writer's commit up to its deadline (busy timeout), then is a timeout naming the file. Where a read-only connection
  cannot get a committed state (a crashed writer's hot journal, a WAL database whose -shm file cannot be created)
  the query is an error that names the file and what to do. Queries in a row on one database share one read
  transaction for up to READ_SPAN: ~8 system calls (locks, change checks) per run instead of per query, and a
  writer waiting for readers to leave waits that long at most, plus the query under way.
* deadlines: a SQLite progress handler interrupts a query at its deadline inside the worker; a worker that has not
  answered by deadline + `grace` (a single C-level operation the handler cannot interrupt) is killed and respawned.
* bounded: SQLite's heap is capped (`PRAGMA hard_heap_limit`), the worker's address space too (`RLIMIT_AS`), text
  and blobs are capped at `max_bytes`, and a result with more than `max_rows` rows or `max_bytes` bytes is an error.

Workers come from a `forkserver` that preloads this module: importing `sqlr1` imports torch (~2 s), which the
fork server pays once; each worker (and each respawn after a kill) is then a fork of it (~20 ms). `spawn` would pay
the import per worker and per respawn; `fork` would copy a parent that may hold CUDA state and threads. As with
spawn, a worker re-imports the main script as `__mp_main__`, so scripts keep their work under `__main__`.
Workers die with their parent however it ends (SIGKILL too, mid-query; ~0.1 s): a watchdog thread in each worker
sees the parent's end of its pipe close and SIGKILLs the fork server, and every worker has asked Linux for SIGKILL
when the fork server dies (`PR_SET_PDEATHSIG`); with no worker left, the resource tracker sees its pipe close and
exits. Should the watchdog not run, workers have dropped their inherited handle on the fork server's liveness pipe,
so the fork server still exits by itself once the parent is gone (after a second or more of tearing down torch),
taking the workers with it. A worker whose parent is gone exits without a word. A worker says "ready" once
started; one that dies before that (typically: the main script, re-imported, creates a Sandbox at import time) is
an error that says what to do, not a respawn loop.
Work is sent in chunks (guided scheduling: chunk = remaining / (2 x workers), at most 64) so that the pipe
round trip is amortised over many queries; each worker publishes which query it is running and since when in
shared memory, so the parent can still kill exactly the culprit and re-queue the rest of its chunk.

Only stdlib: this module must not import torch.
"""

from __future__ import annotations

import ctypes
import gc
import marshal
import math
import multiprocessing as mp
import multiprocessing.forkserver
import os
import re
import resource
import select
import signal
import sqlite3
import sys
import threading
import time
import urllib.parse
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from itertools import chain
from multiprocessing.connection import wait
from pathlib import Path

MAX_CHUNK = 64  # queries per message to a worker
CONNECTIONS_PER_WORKER = 32  # open read-only connections a worker keeps (LRU)
PROGRESS_OPS = 1000  # SQLite VM instructions between two deadline checks
FETCH_ROWS = 64  # rows fetched between two size checks (a batch too big for memory fails with MemoryError)
READ_SPAN = 0.01  # seconds one read transaction may serve queries in a row on a database (bounds a writer's wait)

# Pragmas that only read the schema. Anything else (writable_schema, journal_mode, query_only=0, ...) is denied.
READ_PRAGMAS = frozenset({"table_info", "table_xinfo", "index_list", "index_info", "index_xinfo", "foreign_key_list"})
# load_extension runs native code; fts3_tokenizer reads and overwrites a tokenizer's C pointer (a crash, or worse).
DENIED_FUNCTIONS = frozenset({"load_extension", "fts3_tokenizer"})
READY = b"ready"  # a worker's first message: it started (the main script re-imported, memory capped, ...)
START_TIMEOUT = 120.0  # seconds a worker may take to say READY (forks are ~20 ms; re-importing a script can be slow)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
MAIN_GUARD_HINT = ('workers re-import the main script, so a script that uses Sandbox must keep its work under '
                   '`if __name__ == "__main__":`')


@dataclass(slots=True)
class ExecResult:
    """The outcome of one query: `status` is "ok", "error" (with SQLite's message) or "timeout".

    `rows` holds the result when ok; `truncated` is set when the result broke the row/byte cap (then status is
    "error": a partial result cannot be compared with anything). `crashed`: the worker process died while running
    it (an error of the moment, not necessarily of the query: running it again may succeed).
    """

    status: str
    rows: list[tuple] = field(default_factory=list)
    ncols: int = 0
    error: str | None = None
    truncated: bool = False
    crashed: bool = False
    columns: list[str] = field(default_factory=list)  # column names; filled only with execute_many(row_limit > 0)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


_DB_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def resolve_db(db_root: str | Path, db_id: str) -> Path:
    """`<db_root>/<db_id>/<db_id>.sqlite` (the Spider / BIRD layout); refuses ids that could leave db_root."""
    if not _DB_ID.fullmatch(db_id) or ".." in db_id:
        raise ValueError(f"db_id {db_id!r} is not a plain database name (letters, digits, '_', '-', '.'); refused")
    path = Path(db_root) / db_id / f"{db_id}.sqlite"
    if not path.is_file():
        raise FileNotFoundError(f"database {path} not found: check --db_root / db_root and the db_id {db_id!r}")
    return path


def read_only_uri(db_path: str | Path) -> str:
    """The URI a database is read through: read-only, under SQLite's locks and WAL index (so: committed state)."""
    return f"file:{urllib.parse.quote(str(db_path))}?mode=ro"


# What Python 3.10 (no `sqlite_errorname`) reports for the errors committed_read_problem explains.
_ERROR_NAMES = {"database is locked": "SQLITE_BUSY", "attempt to write a readonly database": "SQLITE_READONLY",
                "unable to open database file": "SQLITE_CANTOPEN"}


def committed_read_problem(error: sqlite3.Error, db_path: str | Path, waited: float) -> tuple[str, str] | None:
    """(status, message) when `error` means a read-only connection could not get the committed state of `db_path`
    (after waiting `waited` seconds for locks): one line naming the file, what is going on and what to do. None for
    any other error (the query's own, a missing file, ...)."""
    name = getattr(error, "sqlite_errorname", None) or _ERROR_NAMES.get(str(error), "")
    if name.startswith("SQLITE_BUSY"):
        return "timeout", (f"database {db_path} is locked by a process writing it: no committed state could be read "
                           f"within {waited:g} s; run the query again once that write is done")
    if not name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN")):
        return None
    if name == "SQLITE_READONLY_ROLLBACK" or name == "SQLITE_READONLY" and os.path.exists(f"{db_path}-journal"):
        return "error", (f"database {db_path} has a hot journal {db_path}-journal: a writer stopped mid-transaction, "
                         f"and a read-only connection cannot roll its half-written pages back; open the database once "
                         f"with write access (e.g. `sqlite3 {db_path} 'PRAGMA quick_check'`) to restore its last commit")
    if _is_wal(db_path):
        return "error", (f"database {db_path} is in WAL mode, and reading it needs {db_path}-shm and -wal files that "
                         f"cannot be created or opened here (a read-only folder?); make its folder writable for this "
                         f"user, or take it out of WAL mode once: `sqlite3 {db_path} 'PRAGMA journal_mode=DELETE'`")
    return None


def _is_wal(db_path: str | Path) -> bool:
    """Whether the file's header marks a WAL database (file format read/write versions 2)."""
    try:
        with open(db_path, "rb") as f:
            header = f.read(20)
    except OSError:
        return False
    return header[:16] == b"SQLite format 3\x00" and header[18] == 2


# --------------------------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------------------------


def _authorize(action: int, arg1: str | None, arg2: str | None, db_name: str | None, source: str | None) -> int:
    """SQLite authorizer: allow reading, deny everything else (writes, DDL, ATTACH, transactions, VACUUM, ...)."""
    if action in (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_RECURSIVE):
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_UPDATE and arg1 == "sqlite_master":
        # SQLite asks this while it sets up a virtual table for reading (json_each, pragma_table_info, an FTS
        # table); a real write to the schema is still impossible: read-only connection, query_only, no pragmas.
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_FUNCTION:  # arg2 is the function name
        return sqlite3.SQLITE_DENY if (arg2 or "").lower() in DENIED_FUNCTIONS else sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA:  # arg1 is the pragma name
        return sqlite3.SQLITE_OK if (arg1 or "").lower() in READ_PRAGMAS else sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_DENY


class _Executor:
    """Runs queries inside one worker process: a small LRU of read-only connections, one deadline at a time.

    A connection is kept per (database, timeout): its busy timeout, how long a query waits for a writer's commit,
    is the query's deadline. Consecutive queries of a chunk on one connection share a read transaction (one lock
    and change check instead of one per query) for at most READ_SPAN seconds; it ends with the chunk, so each
    query reads a commit no older than the `execute_many` call, and a kept connection holds no snapshot between
    chunks."""

    def __init__(self, max_rows: int, max_bytes: int):
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.deadline = math.inf
        self.result_bytes = 0
        self.connections: OrderedDict[tuple[str, float], sqlite3.Connection] = OrderedDict()
        self.reading: tuple[str, float] | None = None  # the key of the connection whose read transaction is open
        self.reading_until = 0.0
        self.own_statement = False  # our BEGIN / COMMIT, which the authorizer lets through

    def _past_deadline(self) -> bool:
        return time.monotonic() > self.deadline

    def _authorize(self, action: int, arg1: str | None, arg2: str | None, db_name: str | None,
                   source: str | None) -> int:
        if self.own_statement and action == sqlite3.SQLITE_TRANSACTION:
            return sqlite3.SQLITE_OK
        return _authorize(action, arg1, arg2, db_name, source)

    def _own(self, conn: sqlite3.Connection, sql: str) -> None:
        self.own_statement = True
        try:
            conn.execute(sql)
        finally:
            self.own_statement = False

    def _read_on(self, key: tuple[str, float]) -> sqlite3.Connection:
        """The connection for key, inside a read transaction (the open one if it is key's and not past its span)."""
        if self.reading is not None and (self.reading != key or time.monotonic() > self.reading_until):
            self.end_read()
        conn = self.connect(*key)
        if self.reading is None:
            self._own(conn, "BEGIN")
            self.reading, self.reading_until = key, time.monotonic() + READ_SPAN
        return conn

    def end_read(self) -> None:
        """End the open read transaction, if any (SQLite may have ended it already, after some errors)."""
        conn = self.connections.get(self.reading) if self.reading is not None else None
        self.reading = None
        if conn is not None and conn.in_transaction:
            self._own(conn, "COMMIT")

    def connect(self, db_path: str, timeout: float) -> sqlite3.Connection:
        key = (db_path, timeout)
        conn = self.connections.get(key)
        if conn is not None:
            self.connections.move_to_end(key)
            return conn
        conn = sqlite3.connect(read_only_uri(db_path), uri=True, timeout=timeout, isolation_level=None,
                               check_same_thread=False)
        conn.execute("PRAGMA query_only = 1")
        conn.execute("PRAGMA temp_store = MEMORY")  # sorts and temp b-trees count against the heap limit, not disk
        conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)  # no ATTACH, and so no VACUUM INTO
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, self.max_bytes)  # randomblob(1e9) -> "string or blob too big"
        if hasattr(conn, "enable_load_extension"):
            conn.enable_load_extension(False)
        conn.set_authorizer(self._authorize)
        conn.set_progress_handler(self._past_deadline, PROGRESS_OPS)
        self.connections[key] = conn
        if len(self.connections) > CONNECTIONS_PER_WORKER:
            self.connections.popitem(last=False)[1].close()
        return conn

    def run(self, db_path: str, sql: str, timeout: float, text_errors: str = "strict", row_limit: int = 0) -> ExecResult:
        """Execute one query; afterwards `result_bytes` is the size of the rows it returned (0 on failure).

        Text that is not valid UTF-8 is an error with text_errors="strict" (as in BIRD's script); with "ignore" its
        undecodable bytes are dropped (Spider's test-suite script). Such text is rare, so "ignore" runs the query
        again with a Python text decoder only after the fast default one failed on it.
        """
        self.deadline = time.monotonic() + timeout
        self.result_bytes = 0
        try:
            conn = self._read_on((db_path, timeout))
            try:
                return self._fetch(conn, sql, row_limit)
            except sqlite3.OperationalError as e:
                if text_errors == "strict" or not str(e).startswith("Could not decode to UTF-8"):
                    raise
                conn.text_factory = _drop_undecodable
                try:
                    return self._fetch(conn, sql, row_limit)
                finally:
                    conn.text_factory = str
        except sqlite3.OperationalError as e:
            if problem := committed_read_problem(e, db_path, timeout):
                return ExecResult(problem[0], error=problem[1])
            if self._past_deadline():
                return ExecResult("timeout", error=f"query exceeded {timeout:g} s")
            return ExecResult("error", error=str(e))
        except MemoryError:
            return ExecResult("error", error="out of memory")
        except Exception as e:  # sqlite3.Error, ValueError for NUL characters, ...
            return ExecResult("error", error=str(e) or type(e).__name__)
        finally:
            self.deadline = math.inf

    def _fetch(self, conn: sqlite3.Connection, sql: str, row_limit: int = 0) -> ExecResult:
        """All rows; with row_limit k > 0 only the first k (a k+1-th one is fetched to tell whether more exist:
        then `truncated` is set on the "ok" result), so a 10-million-row result costs k rows of memory."""
        cursor = conn.execute(sql)
        if cursor.description is None:
            return ExecResult("error", error="not a query: the statement returns no columns")
        ncols = len(cursor.description)
        rows: list[tuple] = []
        nbytes = 0
        if row_limit > 0:
            names = [str(d[0]) for d in cursor.description]
            rows = cursor.fetchmany(row_limit + 1)
            cursor.close()
            more = len(rows) > row_limit
            rows = rows[:row_limit]
            nbytes = sum(map(sys.getsizeof, chain.from_iterable(rows)))
            if nbytes > self.max_bytes:
                return ExecResult("error", ncols=ncols, truncated=True, error=f"result too large (over {self.max_bytes} bytes)")
            self.result_bytes = nbytes
            return ExecResult("ok", rows=rows, ncols=ncols, truncated=more,
                              columns=names)
        while batch := cursor.fetchmany(FETCH_ROWS):
            rows += batch
            nbytes += sum(map(sys.getsizeof, chain.from_iterable(batch)))  # Python object sizes, summed in C
            if len(rows) > self.max_rows or nbytes > self.max_bytes:
                cursor.close()
                return ExecResult("error", ncols=ncols, truncated=True,
                                  error=f"result too large (over {self.max_rows} rows or {self.max_bytes} bytes)")
        self.result_bytes = nbytes
        return ExecResult("ok", rows=rows, ncols=ncols)


def _drop_undecodable(data: bytes) -> str:
    return data.decode(errors="ignore")


def _limit_memory(memory_mb: int) -> None:
    """Cap SQLite's heap at memory_mb and the address space at what the process already maps + 2 x memory_mb."""
    sqlite3.connect(":memory:").execute(f"PRAGMA hard_heap_limit = {memory_mb << 20}")  # process-wide
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    cap = mapped + 2 * (memory_mb << 20)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def _die_with_fork_server(fork_server_pid: int | None) -> None:
    """Tie this worker's life to its parent's: the parent -> fork server -> worker chain ends together.

    The fork server exits when its liveness pipe reads EOF, but every worker inherits a write end of that pipe
    (for processes it would start itself; ours start none), which kept the fork server, and so this worker and the
    resource tracker, alive after the parent died. Dropping it leaves the parent the only writer; then SIGKILL on
    the fork server's death (Linux) stops this worker even inside a C-level SQLite loop. If the fork server died
    before prctl took effect, we have already been re-parented: exit.
    """
    server = multiprocessing.forkserver._forkserver
    if server._forkserver_alive_fd is not None:
        os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if fork_server_pid is not None and os.getppid() != fork_server_pid:
            os._exit(0)


def _watch_parent(conn, fork_server_pid: int | None) -> None:
    """Thread: the moment the parent's end of `conn` closes (the parent died: it closes its end itself only after
    stopping us), SIGKILL the fork server, which served only that parent and would otherwise spend a second or more
    of CPU tearing down its imports; its death takes every worker with it (PR_SET_PDEATHSIG), this one included.
    The query in flight releases the GIL inside SQLite, so this thread runs even then."""
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLRDHUP)
    while not poller.poll()[0][1] & (select.POLLRDHUP | select.POLLHUP):
        pass  # POLLERR / POLLNVAL: nothing to act on
    if fork_server_pid is not None and os.getppid() == fork_server_pid:
        os.kill(fork_server_pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _worker_main(conn, heartbeat, max_rows: int, max_bytes: int, memory_mb: int, fork_server_pid: int | None) -> None:
    """Worker loop: say READY, then receive (timeout, text_errors, row_limit, [(db_path, sql), ...]) and answer the ExecResult
    fields of each; b"" means stop.
    Once the rows gathered for a chunk pass max_bytes it answers the queries done so far (a prefix of the chunk).

    Messages are `marshal`led plain tuples: SQLite values are only None/int/float/str/bytes, and marshal moves
    them about twice as fast as pickle (this round trip is a fifth of the cost of a typical Spider query).
    Before each query it writes (position in chunk, start time) to `heartbeat` so the parent knows whom to kill.
    A parent that is gone (EOF or a broken pipe) ends the loop silently: there is nobody left to answer.
    """
    _die_with_fork_server(fork_server_pid)
    if hasattr(select, "POLLRDHUP"):  # Linux; started before the address-space cap, which then covers its stack
        threading.Thread(target=_watch_parent, args=(conn, fork_server_pid), daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then stops us
    gc.freeze()  # the objects inherited from the fork server (torch's...) are never scanned nor copied-on-write by GC
    _limit_memory(memory_mb)
    executor = _Executor(max_rows, max_bytes)
    try:
        conn.send_bytes(READY)
        while message := conn.recv_bytes():
            timeout, text_errors, row_limit, chunk = marshal.loads(message)
            answers, answer_bytes = [], 0
            for position, (db_path, sql) in enumerate(chunk):
                heartbeat[0] = position
                heartbeat[1] = time.monotonic()
                r = executor.run(db_path, sql, timeout, text_errors, row_limit)
                answers.append((r.status, r.rows, r.ncols, r.error, r.truncated, False, r.columns))
                answer_bytes += executor.result_bytes
                if answer_bytes > max_bytes:  # answer now (memory stays ~2 x max_bytes); the rest goes back later
                    break
            executor.end_read()
            conn.send_bytes(marshal.dumps(answers))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass


# --------------------------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------------------------


def _context() -> mp.context.BaseContext:
    """The forkserver context, preloading this module so workers fork with sqlr1 (and its imports) in place."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["sqlr1.sandbox"])
    return ctx


@dataclass
class _Worker:
    process: mp.process.BaseProcess
    conn: object  # multiprocessing.connection.Connection, our end of the pipe
    heartbeat: object  # shared double[2]: (position in chunk of the running query, its start time)
    chunk: list[int] = field(default_factory=list)  # indices of the items it is working on


def _stop(workers: list[_Worker]) -> None:
    """Kill and reap worker processes (also the finalizer, so that a forgotten Sandbox leaves no process)."""
    for w in workers:
        if w.process.is_alive():
            w.process.kill()
    for w in workers:
        w.process.join(timeout=5)
        w.conn.close()
    workers.clear()


class Sandbox:
    """A pool of SQLite worker processes. Use as a context manager, or call `close()`.

    `timeout` is the default per-query deadline in seconds; `grace` is how long after it a silent worker is killed.
    `gold_cache` keeps results of reference (gold) queries for the pool's lifetime, i.e. one run; it is filled by
    `evaluate.score_pairs` unless that is given its own cache. A cached gold is its database as it was when the gold
    first ran: a run's databases are expected not to change (where they do, give score_pairs `gold_cache={}`).
    """

    def __init__(self, num_workers: int | None = None, timeout: float = 30.0, max_rows: int = 100_000,
                 max_bytes: int = 32 << 20, memory_mb: int = 1024, grace: float = 0.5):
        if getattr(mp.current_process(), "_inheriting", False):
            # We are a worker re-importing a main script that builds a Sandbox at import time. Exit quietly (a
            # fork-server child does not print SystemExit); the parent sees a worker die before READY and explains.
            raise SystemExit(f"error: {MAIN_GUARD_HINT}")
        if num_workers is None:
            num_workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        for name, value, low in (("num_workers", num_workers, 1), ("max_rows", max_rows, 1),
                                 ("max_bytes", max_bytes, 1), ("memory_mb", memory_mb, 16)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Sandbox: {name}={value!r}: must be an integer >= {low}")
        if not 0 < timeout < math.inf:  # NaN fails too (a NaN deadline never comes)
            raise ValueError(f"Sandbox: timeout={timeout!r}: must be a finite number of seconds > 0")
        if not 0 <= grace < math.inf:
            raise ValueError(f"Sandbox: grace={grace!r}: must be a finite number of seconds >= 0")
        self.timeout = timeout
        self.grace = grace
        self._limits = (max_rows, max_bytes, memory_mb)
        self._ctx = _context()
        self.gold_cache: dict[tuple[str, str, str], ExecResult] = {}  # (mode, db path, sql)
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _stop, self._workers)
        for _ in range(num_workers):
            self._workers.append(self._start_worker())
        self._await_ready(self._workers)

    @property
    def num_workers(self) -> int:
        return len(self._workers)

    def _start_worker(self) -> _Worker:
        parent_end, child_end = self._ctx.Pipe()
        heartbeat = self._ctx.RawArray("d", 2)
        multiprocessing.forkserver.ensure_running()
        fork_server_pid = multiprocessing.forkserver._forkserver._forkserver_pid  # the worker's parent-to-be
        process = self._ctx.Process(target=_worker_main, args=(child_end, heartbeat, *self._limits, fork_server_pid),
                                    daemon=True, name="sqlr1-sandbox")
        process.start()
        child_end.close()
        return _Worker(process, parent_end, heartbeat)

    def _await_ready(self, workers: list[_Worker]) -> None:
        """Wait for each worker's READY. One that dies (or hangs) first stops the pool with an error saying what to
        do, instead of a respawn loop: such a worker fails the same way every time it is started."""
        pending = {w.conn: w for w in workers}
        deadline = time.monotonic() + START_TIMEOUT
        while pending:
            ready = wait(list(pending), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                _stop(self._workers)
                raise RuntimeError(f"Sandbox: a worker did not start within {START_TIMEOUT:g} s. The usual cause: "
                                   f"{MAIN_GUARD_HINT}")
            for conn in ready:
                w = pending.pop(conn)
                try:
                    message = conn.recv_bytes()
                except (EOFError, OSError):
                    message = None
                if message != READY:
                    w.process.join(timeout=1.0)
                    _stop(self._workers)
                    raise RuntimeError(f"Sandbox: a worker process died while starting (exit code "
                                       f"{w.process.exitcode}), before running any query. The usual cause: "
                                       f"{MAIN_GUARD_HINT}")

    def _replace(self, worker: _Worker) -> _Worker:
        """Kill a worker (hung or dead) and put a fresh one in its place."""
        index = self._workers.index(worker)
        _stop([worker])
        self._workers[index] = self._start_worker()
        self._await_ready([self._workers[index]])
        return self._workers[index]

    def execute_many(self, items: list[tuple[str, str]], timeout: float | None = None, progress: bool = False,
                     text_errors: str = "strict", row_limit: int = 0) -> list[ExecResult]:
        """Execute each (db_path, sql) read-only; results in input order.

        row_limit k > 0 fetches only the first k rows of each result (multi-turn observations, sqlr1/sql_env.py): an
        "ok" result then has at most k rows, its `columns`, and `truncated` set when the query had more; 0 fetches all (up to the
        pool's max_rows, past which the result is an error).
        Every item is executed: no caching, no de-duplication (callers that want them: `evaluate.score_pairs`).
        text_errors: "strict" (text that is not valid UTF-8 is an error) or "ignore" (its bad bytes are dropped).
        """
        if not self._workers:
            raise RuntimeError("Sandbox is closed; create a new one")
        timeout = self.timeout if timeout is None else timeout
        if not 0 < timeout < math.inf:  # NaN fails too
            raise ValueError(f"execute_many: timeout={timeout!r}: must be a finite number of seconds > 0")
        if text_errors not in ("strict", "ignore"):
            raise ValueError(f"text_errors must be 'strict' or 'ignore', got {text_errors!r}")
        for w in list(self._workers):
            if not w.process.is_alive():  # died while idle (e.g. the OOM killer)
                self._replace(w)
        items = [(str(db_path), sql) for db_path, sql in items]
        if row_limit < 0:
            raise ValueError(f"row_limit={row_limit}: must be >= 0 (0: all rows)")
        job = (timeout, text_errors, int(row_limit))  # what every chunk message carries besides its queries
        results: list[ExecResult | None] = [None] * len(items)
        todo = deque(range(len(items)))
        meter = _Progress(len(items)) if progress else None
        # Results are acyclic: pause the cyclic GC, whose full collections over the caller's heap (all of torch's
        # objects) would otherwise be triggered by the thousands of result tuples this loop creates.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for w in self._workers:
                self._send_chunk(w, items, todo, job)
            while busy := [w for w in self._workers if w.chunk]:
                next_kill = min(w.heartbeat[1] for w in busy) + timeout + self.grace
                ready = wait([w.conn for w in busy], timeout=max(0.0, next_kill - time.monotonic()))
                for w in busy:
                    if w.conn in ready:
                        self._collect(w, items, results, todo, job, meter)
                    elif time.monotonic() > w.heartbeat[1] + timeout + self.grace and not w.conn.poll():
                        fresh = self._fail_culprit(w, results, todo, ExecResult(
                            "timeout", error=f"no answer within {timeout:g} s + {self.grace:g} s grace; worker killed"))
                        self._send_chunk(fresh, items, todo, job)
        except BaseException:  # Ctrl-C included: workers may be mid-chunk, so the pool cannot be trusted any more
            self.close()
            raise
        finally:
            if gc_was_enabled:
                gc.enable()
        if meter:
            meter.finish()
        return results

    def _send_chunk(self, w: _Worker, items: list[tuple[str, str]], todo: deque, job: tuple) -> None:
        """Give an idle worker the next chunk: guided scheduling, len(todo) / (2 x workers), at most MAX_CHUNK."""
        if not todo:
            return
        size = max(1, min(MAX_CHUNK, len(todo) // (2 * len(self._workers))))
        w.chunk = [todo.popleft() for _ in range(min(size, len(todo)))]
        w.heartbeat[0], w.heartbeat[1] = 0, time.monotonic()
        w.conn.send_bytes(marshal.dumps((*job, [items[i] for i in w.chunk])))

    def _collect(self, w: _Worker, items: list, results: list, todo: deque, job: tuple,
                 meter: _Progress | None) -> None:
        try:
            message = w.conn.recv_bytes()
        except (EOFError, OSError):  # the worker died (crash, OOM killer, ...)
            fresh = self._fail_culprit(w, results, todo, ExecResult(
                "error", error=f"worker process died (exit code {w.process.exitcode})", crashed=True))
            self._send_chunk(fresh, items, todo, job)
            return
        chunk, w.chunk = w.chunk, []
        self._send_chunk(w, items, todo, job)  # keep the worker busy while we decode its answers
        answers = marshal.loads(message)
        for i, fields in zip(chunk, answers):
            results[i] = ExecResult(*fields)
        if len(answers) < len(chunk):  # it answered a prefix (size budget): the rest goes back to the queue
            todo.extendleft(reversed(chunk[len(answers):]))
            if not w.chunk:
                self._send_chunk(w, items, todo, job)
        if meter:
            meter.update(len(answers))

    def _fail_culprit(self, w: _Worker, results: list, todo: deque, verdict: ExecResult) -> _Worker:
        """The query the worker was running gets `verdict`, the rest of its chunk goes back to the queue, and a
        fresh worker takes its place (returned)."""
        chunk, position = w.chunk, int(w.heartbeat[0])
        results[chunk[position]] = verdict
        todo.extendleft(reversed(chunk[:position] + chunk[position + 1:]))
        return self._replace(w)

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        for w in self._workers:
            if not w.chunk and w.process.is_alive():
                try:
                    w.conn.send_bytes(b"")
                except OSError:
                    pass
        for w in self._workers:
            w.process.join(timeout=0.5 if not w.chunk else 0)
        _stop(self._workers)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Progress:
    """A one-line progress meter on stderr (stdlib only), redrawn at most ten times a second."""

    def __init__(self, total: int):
        self.total, self.done, self.start, self.shown = total, 0, time.monotonic(), 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.shown > 0.1 or self.done == self.total:
            self.shown = now
            rate = self.done / max(now - self.start, 1e-9)
            sys.stderr.write(f"\r  executed {self.done}/{self.total} queries ({rate:.0f}/s)")
            sys.stderr.flush()

    def finish(self) -> None:
        sys.stderr.write("\n")
