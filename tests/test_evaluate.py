"""Result equality (Spider / BIRD rules), SQL normalisation, voting, score_pairs, the CLI, and real Spider dev."""

import json
import random
import sqlite3
import threading
from pathlib import Path

import pytest

from sqlr1.evaluate import main, normalize_sql, order_matters, results_match, score_pairs, vote
from sqlr1.sandbox import ExecResult, Sandbox, resolve_db

SPIDER = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "spider"


def ok(rows, ncols=None):
    return ExecResult("ok", rows=list(rows), ncols=ncols if ncols is not None else (len(rows[0]) if rows else 1))


ERROR = ExecResult("error", error="no such table: x")
TIMEOUT = ExecResult("timeout", error="query exceeded 1 s")


# ------------------------------------------------------------------ results_match: hand-made results


@pytest.mark.parametrize("pred, gold, mode, ordered, expected", [
    ([], [], "spider", False, True),  # both empty: equal whatever the columns
    ([(1,)], [], "spider", False, False),
    ([(1, "a")], [(1, "a"), (2, "b")], "spider", False, False),  # row count differs
    ([(1, "a")], [(1,)], "spider", False, False),  # column count differs
    ([("a", 1), ("b", 2)], [(1, "a"), (2, "b")], "spider", False, True),  # columns reordered
    ([(1.0, "a")], [(1, "a")], "spider", False, True),  # 1 == 1.0
    ([(1.0, 1.5)], [(1, 1.5)], "spider", False, False),  # official quick check: sorted by str, 1.0 < 1.5 but 1.5 < 1
    ([(2,), (1,)], [(1,), (2,)], "spider", False, True),  # bags ignore order
    ([(2,), (1,)], [(1,), (2,)], "spider", True, False),  # ORDER BY in gold: lists
    ([("b", 2), ("a", 1)], [(2, "b"), (1, "a")], "spider", True, True),  # lists, columns reordered
    ([(1,), (1,), (2,)], [(1,), (2,), (2,)], "spider", False, False),  # bags count duplicates
    ([(1,), (1,), (2,)], [(1,), (2,), (2,)], "bird", False, True),  # sets do not
    ([(1,), (2,)], [(1,), (2,), (2,)], "bird", False, True),
    ([(1, "a")], [("a", 1)], "bird", False, False),  # BIRD: no column permutation
    ([(1, 2), (2, 1)], [(1, 1), (2, 2)], "spider", False, False),  # same column bags, different rows
])
def test_results_match_table(pred, gold, mode, ordered, expected):
    assert results_match(ok(pred), ok(gold), mode, ordered) is expected
    assert results_match(ok(gold), ok(pred), mode, ordered) is expected  # symmetric


def test_failed_side_never_matches():
    for bad in (ERROR, TIMEOUT):
        assert not results_match(bad, ok([(1,)]))
        assert not results_match(ok([(1,)]), bad)
        assert not results_match(bad, bad, "bird")
    with pytest.raises(ValueError, match="mode"):
        results_match(ok([(1,)]), ok([(1,)]), mode="exact")


def test_permutation_search_with_many_columns():
    rng = random.Random(0)
    ncols, nrows = 16, 200
    gold = [tuple(rng.randrange(2) for _ in range(ncols)) for _ in range(nrows)]  # every column is a bag of 0/1
    perm = list(range(ncols))
    rng.shuffle(perm)
    pred = [tuple(row[p] for p in perm) for row in gold]
    rng.shuffle(pred)
    assert results_match(ok(pred), ok(gold))
    # Swap two cells of one column between rows: every column keeps its bag of values, the rows change.
    i, j = next((i, j) for i in range(nrows) for j in range(nrows) if pred[i][0] != pred[j][0])
    broken = [list(r) for r in pred]
    broken[i][0], broken[j][0] = broken[j][0], broken[i][0]
    assert not results_match(ok([tuple(r) for r in broken]), ok(gold))
    # Forty identical columns: interchangeable, tried once each.
    assert results_match(ok([(1,) * 40, (2,) * 40]), ok([(2,) * 40, (1,) * 40]))
    assert not results_match(ok([(1,) * 40, (2,) * 40]), ok([(2,) * 39 + (1,), (1,) * 39 + (2,)]))


def test_order_matters():
    assert order_matters("SELECT a FROM t ORDER BY a DESC")
    assert not order_matters("select a from t order\n  by a")  # the official test is the exact text "order by"
    assert not order_matters("SELECT border_by FROM t")
    assert not order_matters("SELECT a FROM t GROUP BY a")


def test_normalize_sql():
    assert normalize_sql("SELECT DISTINCT a FROM t") == "SELECT  a FROM t"
    assert normalize_sql("select count(distinct a) from t") == "select count( a) from t"  # as the official script
    assert normalize_sql("SELECT DISTINCT a FROM t", keep_distinct=True) == "SELECT DISTINCT a FROM t"
    assert normalize_sql("SELECT a FROM t WHERE b > = 3 AND c < = 2 AND d ! = 1") == \
        "SELECT a FROM t WHERE b >= 3 AND c <= 2 AND d != 1"
    untouched = "SELECT 'distinct; x', \"DISTINCT\" FROM t -- distinct;"
    assert normalize_sql(untouched) == untouched
    assert normalize_sql("SELECT distinction FROM t") == "SELECT distinction FROM t"
    # As the official script: `> =` is replaced everywhere (a plain text replacement), only the first statement runs
    # (when DISTINCT is stripped), and YEAR(CURDATE()) is 2020.
    assert normalize_sql("SELECT 'a > = b'") == "SELECT 'a >= b'"
    assert normalize_sql("SELECT a FROM t; DROP TABLE t") == "SELECT a FROM t;"
    assert normalize_sql("SELECT a FROM t; SELECT 1", keep_distinct=True) == "SELECT a FROM t; SELECT 1"
    assert normalize_sql("SELECT a FROM t WHERE y < year(curdate())") == "SELECT a FROM t WHERE y < 2020"


# ------------------------------------------------------------------ vote


def test_vote_largest_group_by_result_wins():
    cands = [("q0", ok([(1,)])), ("q1", ok([(2,), (3,)])), ("q2", ok([(3,), (2,)])), ("q3", ok([(4.0,)])),
             ("q4", ok([(2,), (3,), (3,)]))]  # q4: the same set as q1 and q2, not the same bag
    v = vote(cands)  # spider rules: bags of rows
    assert (v.sql, v.index, v.votes, v.num_valid, v.all_failed) == ("q1", 1, 2, 5, False)
    v = vote(cands, mode="bird")  # bird rules: sets of rows
    assert (v.sql, v.index, v.votes, v.num_valid, v.all_failed) == ("q1", 1, 3, 5, False)


def test_vote_tie_goes_to_first_seen_group():
    v = vote([("a", ok([(1,)])), ("b", ok([(2,)])), ("c", ok([(2,)])), ("d", ok([(1,)]))])
    assert (v.sql, v.index, v.votes) == ("a", 0, 2)


def test_vote_failures_do_not_vote():
    v = vote([("bad1", ERROR), ("bad2", TIMEOUT), ("x", ok([(5,)])), ("bad3", ERROR)])
    assert (v.sql, v.index, v.votes, v.num_valid, v.all_failed) == ("x", 2, 1, 1, False)


def test_vote_all_failed_keeps_first():
    v = vote([("first", ERROR), ("second", TIMEOUT)])
    assert (v.sql, v.index, v.votes, v.num_valid, v.all_failed) == ("first", 0, 0, 0, True)
    with pytest.raises(ValueError, match="no candidates"):
        vote([])


def test_vote_nan_and_numbers():
    nan = float("nan")
    v = vote([("a", ok([(1,)])), ("b", ok([(nan, 2)])), ("c", ok([(float("nan"), 2.0)]))])
    assert (v.sql, v.votes) == ("b", 2)


# ------------------------------------------------------------------ score_pairs and CLI on a small database


@pytest.fixture(scope="module")
def db_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dbs")
    (root / "shop").mkdir()
    conn = sqlite3.connect(root / "shop" / "shop.sqlite")
    conn.execute("CREATE TABLE item (id INTEGER, name TEXT, price REAL, kind TEXT)")
    conn.executemany("INSERT INTO item VALUES (?, ?, ?, ?)",
                     [(1, "pen", 1.5, "office"), (2, "ink", 4.0, "office"), (3, "tea", 3.0, "food"),
                      (4, "jam", 3.0, "food"), (5, "cup", 2.0, "kitchen")])
    conn.execute("CREATE TABLE note (body TEXT)")
    conn.execute("INSERT INTO note VALUES (CAST(x'61ff62' AS TEXT))")  # 'a', an invalid UTF-8 byte, 'b'
    conn.commit()
    conn.close()
    return root


@pytest.fixture(scope="module")
def pool():
    with Sandbox(num_workers=2, timeout=5.0) as sandbox:
        yield sandbox


def test_score_pairs_rules_and_gold_errors(pool, db_root):
    db = resolve_db(db_root, "shop")
    cases = [  # (pred, gold, spider match)
        ("SELECT price, name FROM item", "SELECT name, price FROM item", True),
        ("SELECT DISTINCT kind FROM item", "SELECT kind FROM item", True),  # DISTINCT stripped from both
        ("SELECT name FROM item ORDER BY price ASC, id", "SELECT name FROM item ORDER BY price DESC, id", False),
        ("SELECT name FROM item WHERE price > = 3", "SELECT name FROM item WHERE price >= 3", True),
        ("SELECT name FROM item", "SELECT nam FROM item", False),  # gold error
        (None, "SELECT name FROM item", False),  # nothing to execute
        ("SELEC name", "SELECT name FROM item", False),
    ]
    verdicts = score_pairs(pool, [p for p, _, _ in cases], [g for _, g, _ in cases], [db] * len(cases),
                           gold_cache={})
    assert [v.match for v in verdicts] == [m for _, _, m in cases]
    assert [v.gold_error for v in verdicts] == [False, False, False, False, True, False, False]
    assert verdicts[4].gold.status == "error" and verdicts[5].pred.status == "error"
    bird = score_pairs(pool, [p for p, _, _ in cases[:2]], [g for _, g, _ in cases[:2]], [db, db], mode="bird",
                       gold_cache={})
    assert [v.match for v in bird] == [False, True]  # no column permutation; sets ignore duplicates


def test_score_pairs_gold_cache(pool, db_root):
    db = resolve_db(db_root, "shop")
    cache: dict = {}
    golds = ["SELECT DISTINCT kind FROM item", "SELECT count(*) FROM item", "SELECT count(*) FROM item"]
    score_pairs(pool, ["SELECT 1"] * 3, golds, [db] * 3, gold_cache=cache)
    assert set(cache) == {("spider", str(db), "SELECT  kind FROM item"),
                          ("spider", str(db), "SELECT count(*) FROM item")}
    # A cached gold is not executed again: planting a result shows it is the one compared against.
    cache[("spider", str(db), "SELECT count(*) FROM item")] = ExecResult("ok", rows=[(1,)], ncols=1)
    [v] = score_pairs(pool, ["SELECT 1"], ["SELECT count(*) FROM item"], [db], gold_cache=cache)
    assert v.match
    # The pool's own cache is the default, and timeouts are not cached.
    slow = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    [v] = score_pairs(pool, ["SELECT 1"], [slow], [db], timeout=0.2)
    assert v.gold.status == "timeout" and ("spider", str(db), slow) not in pool.gold_cache
    with pytest.raises(ValueError, match="one of each"):
        score_pairs(pool, ["SELECT 1"], [], [db])


def test_invalid_utf8_text_follows_each_official_script(pool, db_root):
    """Spider's test-suite script decodes text with errors="ignore"; BIRD's reads it strictly (an error)."""
    db = resolve_db(db_root, "shop")
    pair = (["SELECT 'ab'"], ["SELECT body FROM note"], [db])
    [spider] = score_pairs(pool, *pair, mode="spider", gold_cache={})
    [bird] = score_pairs(pool, *pair, mode="bird", gold_cache={})
    assert spider.match and spider.gold.rows == [("ab",)]
    assert not bird.match and bird.gold_error and "UTF-8" in bird.gold.error


def test_spider_pairs_run_on_every_database_of_the_folder(pool, tmp_path):
    """Test-suite accuracy: two queries that agree on the database but not on its sibling (a test-suite variant)
    do not match in spider mode; bird mode only looks at the database itself."""
    (tmp_path / "d").mkdir()
    for name, rows in (("d", [(1, "x"), (2, "y")]), ("d_1", [(1, "x"), (0, "z")])):
        conn = sqlite3.connect(tmp_path / "d" / f"{name}.sqlite")
        conn.execute("CREATE TABLE t (a INTEGER, s TEXT)")
        conn.executemany("INSERT INTO t VALUES (?, ?)", rows)
        conn.commit()
        conn.close()
    db = tmp_path / "d" / "d.sqlite"
    pred, gold = ["SELECT 1 FROM t WHERE a < 2"], ["SELECT 1 FROM t WHERE s = 'x'"]  # [(1,)] on d, not on d_1
    [spider] = score_pairs(pool, pred, gold, [db], gold_cache={})
    assert not spider.match
    assert spider.pred.rows == [(1,), (1,)] and spider.gold.rows == [(1,)]  # the results of the deciding database
    assert score_pairs(pool, pred, gold, [db], mode="bird", gold_cache={})[0].match
    assert score_pairs(pool, ["SELECT 1 FROM t WHERE s = 'x' AND a = 1"], gold, [db], gold_cache={})[0].match


def test_gold_whose_worker_crashed_is_not_cached(db_root):
    """A worker that dies running a gold query says nothing about the query: it must run again next time."""
    db = resolve_db(db_root, "shop")
    long_gold = "SELECT instr(hex(zeroblob(5000000)), hex(zeroblob(2500000)) || 'x') FROM item"  # seconds in C
    with Sandbox(num_workers=1, timeout=30.0) as sandbox:
        threading.Timer(0.5, sandbox._workers[0].process.kill).start()
        [v] = score_pairs(sandbox, ["SELECT 1"], [long_gold], [db])
        assert v.gold.crashed and "died" in v.gold.error and not v.match
        assert ("spider", str(db), long_gold) not in sandbox.gold_cache
        [again] = score_pairs(sandbox, ["SELECT 1"], ["SELECT count(*) FROM item"], [db])
        assert again.gold.rows == [(5,)] and ("spider", str(db), "SELECT count(*) FROM item") in sandbox.gold_cache


def test_cli_writes_verdicts(db_root, tmp_path, capsys):
    gold = tmp_path / "gold.sql"
    pred = tmp_path / "pred.sql"
    gold.write_text("SELECT name FROM item WHERE kind = 'food'\tshop\n\nSELECT count(*) FROM item\tshop\n"
                    "SELECT nope FROM item\tshop\n")
    pred.write_text("SELECT name FROM item WHERE kind = 'food'\n\nSELECT count(*) + 1 FROM item\n"
                    "SELECT 1\n")
    out = tmp_path / "verdicts.jsonl"
    assert main(["--gold", str(gold), "--pred", str(pred), "--db_root", str(db_root), "--out", str(out),
                 "--workers", "1"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == [
        {"index": 0, "db_id": "shop", "match": True, "pred_status": "ok", "gold_status": "ok"},
        {"index": 1, "db_id": "shop", "match": False, "pred_status": "ok", "gold_status": "ok"},
        {"index": 2, "db_id": "shop", "match": False, "pred_status": "ok", "gold_status": "error"},
    ]
    printed = capsys.readouterr().out
    assert "EX (spider rules): 0.3333  (1/3)" in printed and "gold errors: 1" in printed


def test_cli_bad_inputs(db_root, tmp_path, capsys):
    gold = tmp_path / "gold.sql"
    pred = tmp_path / "pred.sql"
    gold.write_text("SELECT 1\tshop\nSELECT 2\tshop\n")
    pred.write_text("SELECT 1\n")
    assert main(["--gold", str(gold), "--pred", str(pred), "--db_root", str(db_root)]) == 2
    assert "1 lines" in capsys.readouterr().err
    gold.write_text("SELECT 1\t../../etc/passwd\n")
    assert main(["--gold", str(gold), "--pred", str(pred), "--db_root", str(db_root)]) == 2
    assert "refused" in capsys.readouterr().err


def test_cli_refuses_numbers_and_output_paths_before_any_query(db_root, tmp_path, capsys):
    gold = tmp_path / "gold.sql"
    pred = tmp_path / "pred.sql"
    gold.write_text("SELECT 1\tshop\n")
    pred.write_text("SELECT 1\n")
    common = ["--gold", str(gold), "--pred", str(pred), "--db_root", str(db_root)]
    for flags, named in [(["--timeout", "nan"], "--timeout nan"), (["--timeout", "0"], "--timeout 0"),
                         (["--timeout", "inf"], "--timeout inf"), (["--workers", "0"], "--workers 0"),
                         (["--out", str(tmp_path / "no" / "such" / "v.jsonl")], "does not exist"),
                         (["--out", str(tmp_path)], "is a directory")]:
        with pytest.raises(SystemExit) as stop:
            main(common + flags)
        assert stop.value.code == 2
        captured = capsys.readouterr()
        assert named in captured.err and "Traceback" not in captured.err
        assert "EX" not in captured.out and "executed" not in captured.err  # refused before running anything


def test_cli_names_the_file_and_line_of_invalid_utf8(db_root, tmp_path, capsys):
    gold = tmp_path / "gold.sql"
    pred = tmp_path / "pred.sql"
    gold.write_text("SELECT 1\tshop\nSELECT 2\tshop\n")
    pred.write_bytes(b"SELECT 1\nSELECT 'caf\xe9'\n")
    assert main(["--gold", str(gold), "--pred", str(pred), "--db_root", str(db_root)]) == 2
    err = capsys.readouterr().err
    assert f"{pred}:2:" in err and "0xe9" in err and "UTF-8" in err


def test_cli_with_nothing_to_score_fails(db_root, tmp_path, capsys):
    gold = tmp_path / "gold.sql"
    pred = tmp_path / "pred.sql"
    gold.write_text("")
    pred.write_text("")
    assert main(["--gold", str(gold), "--pred", str(pred), "--db_root", str(db_root)]) == 2
    captured = capsys.readouterr()
    assert "nothing to score" in captured.err and "EX" not in captured.out


# ------------------------------------------------------------------ real Spider dev (skipped when absent)


def spider_gold():
    if not (SPIDER / "dev_gold.sql").is_file():
        pytest.skip(f"Spider data not found at {SPIDER}")
    pairs = []
    for line in (SPIDER / "dev_gold.sql").read_text().splitlines():
        sql, db_id = line.rsplit("\t", 1)
        if (SPIDER / "database" / db_id / f"{db_id}.sqlite").is_file():
            pairs.append((sql, resolve_db(SPIDER / "database", db_id)))
    return pairs


@pytest.mark.parametrize("mode", ["spider", "bird"])
def test_spider_dev_golds_match_themselves(pool, mode):
    pairs = spider_gold()
    assert len(pairs) == 972
    # The pred is the gold plus a trailing space, so both sides are executed separately.
    verdicts = score_pairs(pool, [sql + " " for sql, _ in pairs], [sql for sql, _ in pairs],
                           [db for _, db in pairs], mode=mode, gold_cache={})
    assert all(v.pred.ok and v.gold.ok for v in verdicts)
    assert all(v.match for v in verdicts)


def test_spider_dev_hand_made_mismatches(pool):
    spider_gold()
    db = resolve_db(SPIDER / "database", "concert_singer")
    gold_where = "SELECT avg(age), min(age), max(age) FROM singer WHERE country = 'France'"
    gold_order = "SELECT name, country, age FROM singer ORDER BY age DESC"
    gold_limit = "SELECT song_name FROM singer ORDER BY age LIMIT 1"
    gold_cols = "SELECT name, country, age FROM singer"
    gold_distinct = "SELECT country FROM singer WHERE age > 20"
    cases = [
        ("dropped WHERE", "SELECT avg(age), min(age), max(age) FROM singer", gold_where, False),
        ("flipped ORDER BY", "SELECT name, country, age FROM singer ORDER BY age ASC", gold_order, False),
        ("LIMIT + 1", "SELECT song_name FROM singer ORDER BY age LIMIT 2", gold_limit, False),
        ("column dropped", "SELECT name, country FROM singer", gold_cols, False),
        ("columns reordered", "SELECT age, name, country FROM singer", gold_cols, True),
        ("columns reordered, ordered", "SELECT age, country, name FROM singer ORDER BY age DESC", gold_order, True),
        ("DISTINCT added", "SELECT DISTINCT country FROM singer WHERE age > 20", gold_distinct, True),
    ]
    verdicts = score_pairs(pool, [p for _, p, _, _ in cases], [g for _, _, g, _ in cases], [db] * len(cases),
                           gold_cache={})
    assert all(v.pred.ok and v.gold.ok for v in verdicts)
    assert {name: v.match for (name, *_), v in zip(cases, verdicts)} == {name: m for name, *_, m in cases}
    # DISTINCT must change the raw result for that case to mean anything
    raw = pool.execute_many([(db, cases[-1][1]), (db, gold_distinct)])
    assert len(raw[0].rows) < len(raw[1].rows)


def test_vote_compares_candidates_as_the_evaluator_does(pool, db_root):
    """Real SQLite results: with ORDER BY the order of the rows counts; columns may come in any order."""
    db = str(resolve_db(db_root, "shop"))
    office = "SELECT name FROM item WHERE kind = 'office'"
    sqls = [office + " ORDER BY price DESC",  # ink, pen
            office + " ORDER BY price",  # pen, ink
            office + " ORDER BY price ASC",  # pen, ink
            office]  # pen, ink (no ORDER BY, but the others have one: compared in order)
    results = pool.execute_many([(db, q) for q in sqls])
    assert [r.rows for r in results] == [[("ink",), ("pen",)]] + [[("pen",), ("ink",)]] * 3
    v = vote(list(zip(sqls, results)))
    assert (v.sql, v.index, v.votes, v.num_valid) == (sqls[1], 1, 3, 4)  # a row set would have made one group of 4
    # the winner is the candidate the evaluator scores as correct against an ordered gold
    golds = score_pairs(pool, [v.sql, sqls[0]], [sqls[2]] * 2, [db] * 2)
    assert [g.match for g in golds] == [True, False]

    sqls = ["SELECT name, price FROM item WHERE kind = 'food'", "SELECT price, name FROM item WHERE kind = 'food'",
            "SELECT name FROM item WHERE kind = 'food'", "SELECT price, name FROM item WHERE kind = 'food'"]
    v = vote(list(zip(sqls, pool.execute_many([(db, q) for q in sqls]))))
    assert (v.sql, v.index, v.votes) == (sqls[0], 0, 3)  # spider EX matches columns under any permutation
