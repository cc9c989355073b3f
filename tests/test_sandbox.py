"""The sandbox through its real process pool: results, containment, deadlines, hard kills, cleanup."""

import hashlib
import os
import random
import signal
import sqlite3
import threading
import time

import pytest

from sqlr1.sandbox import ExecResult, Sandbox, resolve_db

TIMEOUT = 1.0  # per-query deadline for the hostile battery
# One SQLite operation (instr on 10 MB strings, O(n*m)) that the progress handler cannot interrupt.
C_LEVEL_LOOP = "SELECT instr(hex(zeroblob(5000000)), hex(zeroblob(2500000)) || 'x')"


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("dbs") / "toy" / "toy.sqlite"
    path.parent.mkdir()
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT)")
    conn.executemany("INSERT INTO t VALUES (?, ?)", [(i, f"name{i}") for i in range(50)])
    conn.execute("CREATE TABLE bad (txt TEXT)")
    conn.execute("INSERT INTO bad VALUES (CAST(x'fffe41' AS TEXT))")  # invalid UTF-8 stored as TEXT
    conn.commit()
    conn.close()
    return path


@pytest.fixture(scope="module")
def pool():
    with Sandbox(num_workers=2, timeout=2.0) as sandbox:
        yield sandbox


def test_results_come_back_in_input_order(pool, db):
    items = [(db, f"SELECT id, name, {k} FROM t WHERE id = {k % 50}") for k in range(300)]
    results = pool.execute_many(items)
    assert [r.rows for r in results] == [[(k % 50, f"name{k % 50}", k)] for k in range(300)]
    assert all(r.ok and r.ncols == 3 and r.error is None and not r.truncated for r in results)


def test_errors_carry_sqlite_message(pool, db, tmp_path):
    no_column, missing_db = pool.execute_many([(db, "SELECT nope FROM t"), (tmp_path / "absent.sqlite", "SELECT 1")])
    assert no_column.status == "error" and "no such column: nope" in no_column.error
    assert missing_db.status == "error" and "unable to open" in missing_db.error
    assert not (tmp_path / "absent.sqlite").exists()


def test_empty_batch(pool):
    assert pool.execute_many([]) == []


def test_resolve_db_refuses_traversal(db):
    root = db.parent.parent
    assert resolve_db(root, "toy") == db
    for hostile in ["../../etc/passwd", "/etc/passwd", "toy/../toy", "..", "a\\b", "", "toy\x00"]:
        with pytest.raises(ValueError, match="refused"):
            resolve_db(root, hostile)
    with pytest.raises(FileNotFoundError, match="not_there"):
        resolve_db(root, "not_there")


_rng = random.Random(0)
_GARBAGE = "".join(_rng.choice("SELECT FROM WHERE ()*,;'\"`[]-/+=<>abc123\n\t") for _ in range(1 << 20))
_BINARY = _rng.randbytes(1 << 20).decode("latin-1")  # includes NUL characters
_RECURSIVE = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c"
# {folder} is the database's folder: files that ATTACH / VACUUM INTO would create must not appear there.
HOSTILE = {
    "insert": "INSERT INTO t VALUES (999, 'x')",
    "insert_returning": "INSERT INTO t SELECT id + 100, name FROM t RETURNING id",
    "update": "UPDATE t SET name = 'x'",
    "delete": "DELETE FROM t",
    "replace": "REPLACE INTO t VALUES (1, 'y')",
    "cte_delete": "WITH x AS (SELECT 1) DELETE FROM t",
    "create_table": "CREATE TABLE u (a)",
    "create_temp_table": "CREATE TEMP TABLE u (a)",
    "create_index": "CREATE INDEX i ON t (name)",
    "create_view": "CREATE VIEW v AS SELECT 1",
    "create_trigger": "CREATE TRIGGER tr AFTER INSERT ON t BEGIN DELETE FROM t; END",
    "drop_table": "DROP TABLE t",
    "alter_add": "ALTER TABLE t ADD COLUMN c",
    "alter_rename": "ALTER TABLE t RENAME TO u",
    "reindex": "REINDEX",
    "analyze": "ANALYZE",
    "begin": "BEGIN IMMEDIATE",
    "commit": "COMMIT",  # the worker's own read transaction is open: still not the query's to end
    "rollback": "ROLLBACK",
    "savepoint": "SAVEPOINT s",
    "vacuum": "VACUUM",
    "vacuum_into": "VACUUM INTO '{folder}/copy.sqlite'",
    "attach_new_file": "ATTACH '{folder}/new.sqlite' AS n",
    "load_extension": "SELECT load_extension('{folder}/evil.so')",
    "fts3_tokenizer_pointer": "SELECT fts3_tokenizer('simple')",  # leaks (and can overwrite) a C function pointer
    "update_schema": "UPDATE sqlite_master SET sql = 'x'",
    "writable_schema": "PRAGMA writable_schema = 1",
    "journal_mode_wal": "PRAGMA journal_mode = WAL",
    "query_only_off": "PRAGMA query_only = 0",
    "user_version": "PRAGMA user_version = 7",
    "two_statements": "SELECT 1; DROP TABLE t",
    "select_then_attach": "SELECT 1; ATTACH '{folder}/new2.sqlite' AS n",
    "infinite_recursive_cte": f"{_RECURSIVE}) SELECT count(*) FROM c",
    "infinite_recursive_rows": f"{_RECURSIVE}) SELECT x FROM c",
    "cartesian_count": "SELECT count(*) FROM t a, t b, t c, t d, t e, t f",
    "cartesian_rows": "SELECT * FROM t a, t b, t c, t d",
    "randomblob_1e9": "SELECT randomblob(1000000000)",
    "randomblob_rows": "SELECT randomblob(2000000) FROM t a, t b",
    "randomblob_concat": "SELECT length(group_concat(randomblob(1000000))) FROM t a, t b",
    "ten_million_rows": f"{_RECURSIVE} LIMIT 10000000) SELECT x FROM c",
    "invalid_utf8": "SELECT txt FROM bad",
    "empty": "",
    "whitespace_and_comment": "  -- nothing here\n",
    "garbage_1mb": _GARBAGE,
    "binary_garbage_1mb": _BINARY,
    "c_level_loop": C_LEVEL_LOOP,
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_sql_is_contained(pool, db, name):
    folder = db.parent
    sql = HOSTILE[name].replace("{folder}", str(folder))
    before_bytes, before_files = hashlib.sha256(db.read_bytes()).hexdigest(), sorted(os.listdir(folder))
    cwd_files = sorted(os.listdir("."))

    start = time.monotonic()
    [result] = pool.execute_many([(db, sql)], timeout=TIMEOUT)
    elapsed = time.monotonic() - start

    assert result.status in ("error", "timeout"), (name, result)
    assert elapsed < TIMEOUT + 1.0, (name, elapsed)  # a liveness bound, not a speed claim
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before_bytes
    assert sorted(os.listdir(folder)) == before_files
    assert sorted(os.listdir(".")) == cwd_files
    [normal] = pool.execute_many([(db, "SELECT count(*) FROM t")])
    assert normal.rows == [(50,)]


def test_hard_kill_requeues_the_rest_of_the_chunk(db):
    with Sandbox(num_workers=1, timeout=TIMEOUT, grace=0.2) as sandbox:
        pid = sandbox._workers[0].process.pid
        items = [(db, f"SELECT {k}") for k in range(20)] + [(db, C_LEVEL_LOOP)] + [(db, f"SELECT {k}") for k in range(20)]
        results = sandbox.execute_many(items)
        assert results[20].status == "timeout" and "killed" in results[20].error
        assert [r.rows for r in results[:20] + results[21:]] == [[(k,)] for k in range(20)] * 2
        assert sandbox._workers[0].process.pid != pid  # respawned


def test_ctrl_c_stops_every_worker(db):
    sandbox = Sandbox(num_workers=2, timeout=5.0)
    processes = [w.process for w in sandbox._workers]
    threading.Timer(0.3, os.kill, args=(os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        sandbox.execute_many([(db, C_LEVEL_LOOP)] * 2)
    assert not any(p.is_alive() for p in processes)
    with pytest.raises(RuntimeError, match="closed"):
        sandbox.execute_many([(db, "SELECT 1")])


def test_context_manager_stops_workers(db):
    with Sandbox(num_workers=2) as sandbox:
        processes = [w.process for w in sandbox._workers]
        assert sandbox.execute_many([(db, "SELECT 1")])[0] == ExecResult("ok", rows=[(1,)], ncols=1)
    assert not any(p.is_alive() for p in processes)


def test_row_and_byte_caps(db):
    with Sandbox(num_workers=1, max_rows=10, max_bytes=10_000) as sandbox:
        fits, too_many, too_big = sandbox.execute_many([
            (db, "SELECT id FROM t LIMIT 10"), (db, "SELECT id FROM t LIMIT 11"), (db, "SELECT zeroblob(20000)")])
    assert fits.ok and len(fits.rows) == 10
    assert too_many.status == "error" and too_many.truncated and too_many.rows == []
    assert too_big.status == "error"


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="num_workers"):
        Sandbox(num_workers=0)


def test_memory_cap_fails_the_query_not_the_machine(db):
    grow = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 2000000) "
            "SELECT count(*) FROM (SELECT DISTINCT hex(randomblob(16)) FROM c)")  # ~100 MB of distinct keys
    with Sandbox(num_workers=1, timeout=30.0, memory_mb=16) as sandbox:
        big, normal = sandbox.execute_many([(db, grow), (db, "SELECT count(*) FROM t")])
    assert big.status == "error" and big.error == "out of memory"
    assert normal.rows == [(50,)]


def test_dead_workers_are_replaced(db):
    with Sandbox(num_workers=1, timeout=5.0) as sandbox:
        idle = sandbox._workers[0].process
        idle.kill()
        idle.join()
        assert sandbox.execute_many([(db, "SELECT count(*) FROM t")])[0].rows == [(50,)]  # died while idle
        busy = sandbox._workers[0].process
        threading.Timer(0.3, busy.kill).start()  # dies mid-query
        items = [(db, "SELECT 1"), (db, C_LEVEL_LOOP), (db, "SELECT 2")]
        first, crashed, last = sandbox.execute_many(items)
    assert crashed.status == "error" and "died" in crashed.error
    assert (first.rows, last.rows) == ([(1,)], [(2,)])


def test_virtual_tables_can_be_read(pool, db, tmp_path):
    """Table-valued functions and FTS tables are read through a virtual table, which SQLite sets up with a schema
    'update' the authorizer must let through (the connection stays read-only)."""
    json_rows, pragma_rows = pool.execute_many([
        (db, "SELECT value FROM json_each('[1, 2]')"), (db, "SELECT name FROM pragma_table_info('t')")])
    assert json_rows.rows == [(1,), (2,)] and pragma_rows.rows == [("id",), ("name",)]
    fts = tmp_path / "fts.sqlite"
    conn = sqlite3.connect(fts)
    try:
        conn.execute("CREATE VIRTUAL TABLE docs USING fts4(body)")
    except sqlite3.OperationalError:
        pytest.skip("this SQLite has no FTS4")
    conn.execute("INSERT INTO docs VALUES ('hello world')")
    conn.commit()
    conn.close()
    before = hashlib.sha256(fts.read_bytes()).hexdigest()
    match, write = pool.execute_many([(fts, "SELECT body FROM docs WHERE docs MATCH 'hello'"),
                                      (fts, "INSERT INTO docs VALUES ('x')")])
    assert match.rows == [("hello world",)] and write.status == "error"
    assert hashlib.sha256(fts.read_bytes()).hexdigest() == before


def test_a_chunk_of_large_results_is_answered_in_parts(db):
    """Results that each fit max_bytes but together would not fit the worker's memory: every one comes back."""
    big = "SELECT printf('%.*c', 3000000, 'x')"  # 3 MB of text per query, under the 4 MB cap
    with Sandbox(num_workers=1, max_bytes=4 << 20, memory_mb=16) as sandbox:
        results = sandbox.execute_many([(db, big)] * 40 + [(db, "SELECT count(*) FROM t")])
    assert [r.status for r in results] == ["ok"] * 41
    assert all(len(r.rows[0][0]) == 3_000_000 for r in results[:40]) and results[40].rows == [(50,)]


def test_invalid_utf8_is_an_error_or_loses_its_bad_bytes(pool, db):
    strict, lenient, normal = pool.execute_many([(db, "SELECT txt FROM bad")]), pool.execute_many(
        [(db, "SELECT txt FROM bad")], text_errors="ignore"), pool.execute_many([(db, "SELECT name FROM t LIMIT 1")],
                                                                                text_errors="ignore")
    assert strict[0].status == "error" and "UTF-8" in strict[0].error
    assert lenient[0].rows == [("A",)]  # x'fffe41': the two undecodable bytes are dropped (Spider's test-suite rule)
    assert normal[0].rows == [("name0",)]
    assert pool.execute_many([(db, "SELECT txt FROM bad")])[0].status == "error"  # the connection is strict again
    with pytest.raises(ValueError, match="text_errors"):
        pool.execute_many([(db, "SELECT 1")], text_errors="replace")
