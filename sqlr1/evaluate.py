"""Execution accuracy: do two queries return the same result? Spider and BIRD rules, the scoring CLI, voting.

Spider (test-suite execution rules, Zhong et al. 2020): results R_pred and R_gold are equal when both are empty,
or when they have the same number of rows and columns and some permutation pi of the pred's columns gives
    rows(R_pred o pi) == rows(R_gold)       as lists, if the gold SQL has ORDER BY,
    bag(R_pred o pi) == bag(R_gold)         as multisets, otherwise;
after the official quick check that the rows, each with its values sorted by str(value) + str(type(value)), agree
(as lists, or as sets). Before executing, both queries get the official rewrites: `> =` -> `>=` (also `< =`,
`! =`), YEAR(CURDATE()) -> 2020, and unless keep_distinct, only the first statement is kept and every DISTINCT
keyword is removed. "Has ORDER BY" is the official test: the text `order by` occurs in the lower-cased gold SQL.
A pair is checked on its database and on every other `*.sqlite` file in that database's folder (a distilled test
suite, when one is installed there) and matches only if it matches on all of them.
BIRD (Li et al. 2023):  set(R_pred) == set(R_gold), on the database alone.
Values compare with Python `==` (and hash), so 1 == 1.0.

Spider hardness levels are not computed: they need the official SQL parser (absent here).

CLI, in the official file formats:
    python -m sqlr1.evaluate --gold dev_gold.sql --pred pred.sql --db_root database [--mode spider|bird]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from sqlr1.sandbox import ExecResult, Sandbox, resolve_db

MODES = ("spider", "bird")

# Things normalize_sql must leave alone (string literals, quoted identifiers, comments), then the things it edits.
_SQL_TOKEN = re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|`[^`]*`|\[[^\]]*\]|--[^\n]*|/\*.*?\*/|\bdistinct\b|;""",
                        re.IGNORECASE | re.DOTALL)
_CURRENT_YEAR = re.compile(r"YEAR\s*\(\s*CURDATE\s*\(\s*\)\s*\)\s*", re.IGNORECASE)


def order_matters(gold_sql: str) -> bool:
    """Spider compares rows in order exactly when the gold query has ORDER BY (the official substring test)."""
    return "order by" in gold_sql.lower()


def normalize_sql(sql: str, keep_distinct: bool = False) -> str:
    """Spider's pre-execution rewrites, as the official test-suite script makes them.

    `> =`, `< =`, `! =` -> `>=`, `<=`, `!=` and YEAR(CURDATE()) -> 2020 are plain text replacements (string
    literals included, as there). Unless keep_distinct: the text after the first statement's `;` is dropped, and
    so is every DISTINCT keyword, also inside aggregates (`count(DISTINCT x)`), but never inside string literals,
    quoted identifiers or comments (the official script does this on sqlparse tokens).
    """
    sql = sql.replace("> =", ">=").replace("< =", "<=").replace("! =", "!=")
    sql = _CURRENT_YEAR.sub("2020", sql)
    if keep_distinct:
        return sql
    end = next((m.end() for m in _SQL_TOKEN.finditer(sql) if m.group(0) == ";"), len(sql))
    return _SQL_TOKEN.sub(lambda m: "" if m.group(0).lower() == "distinct" else m.group(0), sql[:end])


def _unordered_row(row: tuple) -> tuple:
    """The official quick check's row key: its values sorted by str(value) + str(type(value))."""
    return tuple(sorted(row, key=lambda x: str(x) + str(type(x))))


def _spider_rows_equal(pred: list[tuple], gold: list[tuple], in_order: bool) -> bool:
    if not pred and not gold:
        return True
    if len(pred) != len(gold) or len(pred[0]) != len(gold[0]):
        return False
    pred_keys, gold_keys = map(_unordered_row, pred), map(_unordered_row, gold)
    if (list(pred_keys) != list(gold_keys)) if in_order else (set(pred_keys) != set(gold_keys)):
        return False  # rejected by the official quick check (it also tells 1 from 1.0 when their sort keys differ)
    if pred == gold or (not in_order and Counter(pred) == Counter(gold)):  # the identity permutation: most matches
        return True
    pred_cols, gold_cols = list(zip(*pred)), list(zip(*gold))
    if in_order:
        # Lists of rows are equal under pi iff every gold column equals its pred column as a sequence, so a pi
        # exists iff the two multisets of column sequences are equal.
        return Counter(pred_cols) == Counter(gold_cols)
    return _bag_permutation_exists(pred_cols, gold_cols)


def _bag_permutation_exists(pred_cols: list[tuple], gold_cols: list[tuple]) -> bool:
    """Is there a pi with bag(rows of pred columns pi(0..n-1)) == bag(gold rows)? Backtracking search.

    Gold column j may only map to a pred column with the same multiset of values; gold columns are assigned fewest
    candidates first; a partial assignment survives only if the projected rows already agree as bags; and
    pred columns identical as sequences are interchangeable, so only one of them is tried at each step. Together
    these keep the search linear in practice even with many columns.
    """
    def signature(col: tuple) -> frozenset:
        return frozenset(Counter(col).items())

    pred_sigs = [signature(c) for c in pred_cols]
    candidates = [[i for i, s in enumerate(pred_sigs) if s == gold_sig] for gold_sig in map(signature, gold_cols)]
    gold_order = sorted(range(len(gold_cols)), key=lambda j: len(candidates[j]))

    def projected_bag(cols: list[tuple]) -> Counter:
        return Counter(zip(*cols))

    def extend(chosen: list[int]) -> bool:
        depth = len(chosen)
        if depth == len(gold_order):
            return True
        tried: set[tuple] = set()
        for i in candidates[gold_order[depth]]:
            if i in chosen or pred_cols[i] in tried:
                continue
            tried.add(pred_cols[i])
            trial = chosen + [i]
            if projected_bag([pred_cols[k] for k in trial]) == projected_bag(
                    [gold_cols[j] for j in gold_order[:depth + 1]]) and extend(trial):
                return True
        return False

    return extend([])


def results_match(pred: ExecResult, gold: ExecResult, mode: str = "spider", order_matters: bool = False) -> bool:
    """Equal results under `mode` ("spider" or "bird", see the module docstring). A failed side never matches."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not (pred.ok and gold.ok):
        return False
    if mode == "bird":
        return set(pred.rows) == set(gold.rows)
    return _spider_rows_equal(pred.rows, gold.rows, order_matters)


@dataclass(frozen=True)
class Verdict:
    """One scored pair. `gold_error`: the gold query failed, so the pair is unscorable (never a match)."""

    match: bool
    pred: ExecResult
    gold: ExecResult

    @property
    def gold_error(self) -> bool:
        return not self.gold.ok


_NOT_EXECUTED = ExecResult("error", error="no SQL to execute")


def score_pairs(sandbox: Sandbox, preds: list[str | None], golds: list[str], db_paths: list[str | Path],
                mode: str = "spider", timeout: float | None = None, keep_distinct: bool = False,
                gold_cache: dict | None = None, progress: bool = False) -> list[Verdict]:
    """Execute every (pred, gold) pair on its database and compare the results under `mode`.

    In spider mode a pair runs on its database and on every other `*.sqlite` file of that folder (a test suite) and
    matches when it matches on all of them. One `execute_many` call runs each distinct (db, sql) once, and each
    distinct (pred, gold) pair is compared once.
    Gold results are reused from `gold_cache` (default: `sandbox.gold_cache`, which lives as long as the pool),
    keyed by (mode, db path, executed SQL). A pred of None is not executed. Text that is not valid UTF-8 loses its
    bad bytes in spider mode (the test-suite script decodes with errors="ignore") and is an error in bird mode.
    """
    if not len(preds) == len(golds) == len(db_paths):
        raise ValueError(f"score_pairs: {len(preds)} preds, {len(golds)} golds, {len(db_paths)} db_paths; "
                         "need one of each per pair")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    cache = sandbox.gold_cache if gold_cache is None else gold_cache

    prepared: dict[str, str] = {}  # rollouts repeat each other: normalise each distinct SQL once

    def prepare(sql: str) -> str:
        if sql not in prepared:
            prepared[sql] = normalize_sql(sql, keep_distinct) if mode == "spider" else sql
        return prepared[sql]

    suites: dict[str, list[str]] = {}

    def suite(db: str | Path) -> list[str]:  # the databases a pair runs on, its own first
        db = str(db)
        if db not in suites:
            suites[db] = [db] + (sibling_databases(db) if mode == "spider" else [])
        return suites[db]

    gold_runs = [[(d, prepare(g)) for d in suite(db)] for db, g in zip(db_paths, golds)]
    pred_runs = [[(d, prepare(p)) for d in suite(db)] if p is not None else [] for db, p in zip(db_paths, preds)]
    gold_keys = [key for run in gold_runs for key in run]
    todo = list(dict.fromkeys([k for k in gold_keys if (mode, *k) not in cache] + [k for r in pred_runs for k in r]))
    text_errors = "ignore" if mode == "spider" else "strict"  # how each official script reads invalid UTF-8
    fresh = dict(zip(todo, sandbox.execute_many(todo, timeout=timeout, progress=progress, text_errors=text_errors)))
    for key in gold_keys:  # timeouts depend on load and crashes on the moment: run those again next time
        if key in fresh and fresh[key].status != "timeout" and not fresh[key].crashed:
            cache[(mode, *key)] = fresh[key]

    verdicts, compared = [], {}
    for gold_sql, gold_run, pred_run in zip(golds, gold_runs, pred_runs):
        pair = (tuple(pred_run), tuple(gold_run), gold_sql)
        if pair not in compared:
            gold_results = [fresh[k] if k in fresh else cache[(mode, *k)] for k in gold_run]
            pred_results = [fresh[k] for k in pred_run] or [_NOT_EXECUTED] * len(gold_run)
            compared[pair] = _suite_verdict(pred_results, gold_results, mode, order_matters(gold_sql))
        verdicts.append(compared[pair])
    return verdicts


def sibling_databases(db_path: str | Path) -> list[str]:
    """The other `*.sqlite` files in a database's folder: the official Spider script checks a pair on every database
    there (a distilled test suite, Zhong et al. 2020); a folder of the plain Spider release holds just the one."""
    db_path = Path(db_path)
    return sorted(str(p) for p in db_path.parent.glob("*.sqlite") if p.name != db_path.name)


def _suite_verdict(preds: list[ExecResult], golds: list[ExecResult], mode: str, ordered: bool) -> Verdict:
    """A match on every database of the suite. The results kept are those of the first database that decides."""
    for pred, gold in zip(preds, golds):
        if not results_match(pred, gold, mode, ordered):
            return Verdict(False, pred, gold)
    return Verdict(True, preds[0], golds[0])


# --------------------------------------------------------------------------------------------------------------
# Self-consistency voting
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vote:
    """The winner of a self-consistency vote: its SQL and index, the size of its group, how many could vote."""

    sql: str
    index: int
    votes: int
    num_valid: int
    all_failed: bool


_NAN = object()  # stands for every NaN, which is otherwise unequal to itself


def _without_nan(result: ExecResult) -> ExecResult:
    """The result with every NaN replaced by one shared object, so that two NaN results compare equal."""
    rows = [tuple(_NAN if isinstance(v, float) and math.isnan(v) else v for v in row) for row in result.rows]
    return replace(result, rows=rows)


def vote(candidates: list[tuple[str, ExecResult]], mode: str = "spider") -> Vote:
    """Self-consistency: group candidates whose results the evaluator would call equal; the largest group wins.

    Candidates i and j agree when `results_match(R_i, R_j, mode, ordered)` with
    ordered = order_matters(sql_i) or order_matters(sql_j): the rules EX is scored with (spider: same bag of rows up
    to a column permutation, same list of rows when ordered; bird: same set of rows), the SQL having ORDER BY
    standing in for the gold's. Each candidate joins the first group whose first member it agrees with.
    Failed or timed-out candidates do not vote. Ties go to the group seen first, and the answer is the first SQL
    of the winning group. If every candidate failed, all_failed is set and the first candidate is kept.
    """
    if not candidates:
        raise ValueError("vote: no candidates")
    groups: list[list[int]] = []  # in order first seen; groups[g][0] is the member the others are compared with
    results = [_without_nan(r) if r.ok else r for _, r in candidates]
    for index, ((sql, _), result) in enumerate(zip(candidates, results)):
        if not result.ok:
            continue
        for group in groups:
            first_sql = candidates[group[0]][0]
            if results_match(result, results[group[0]], mode, order_matters(sql) or order_matters(first_sql)):
                group.append(index)
                break
        else:
            groups.append([index])
    if not groups:
        return Vote(candidates[0][0], 0, 0, 0, all_failed=True)
    winner = max(groups, key=len)  # max keeps the first of equals
    return Vote(candidates[winner[0]][0], winner[0], len(winner), sum(map(len, groups)), all_failed=False)


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------


def read_pairs(gold_file: Path, pred_file: Path) -> list[tuple[str, str, str]]:
    """(pred_sql, gold_sql, db_id) per pair. GOLD lines are `SQL<TAB>db_id`, PRED lines one SQL each (text after a
    tab ignored); a blank GOLD line separates interactions and is skipped with the PRED line beside it."""
    gold_lines = _read_lines(gold_file)
    pred_lines = _read_lines(pred_file)
    while gold_lines and not gold_lines[-1].strip():
        gold_lines.pop()
    if len(pred_lines) < len(gold_lines) or any(line.strip() for line in pred_lines[len(gold_lines):]):
        raise ValueError(f"{pred_file} has {len(pred_lines)} lines but {gold_file} has {len(gold_lines)}: "
                         "write one prediction per gold line (blank where the gold line is blank)")
    pairs = []
    for number, (gold_line, pred_line) in enumerate(zip(gold_lines, pred_lines), start=1):
        if not gold_line.strip():
            continue
        if "\t" not in gold_line:
            raise ValueError(f"{gold_file}:{number}: expected `SQL<TAB>db_id`, found no tab")
        gold_sql, db_id = gold_line.strip().rsplit("\t", 1)
        pairs.append((pred_line.split("\t")[0].strip(), gold_sql.strip(), db_id.strip()))
    return pairs


def _read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file; text that is not UTF-8 is a ValueError naming the file, line and byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {column}: {e.reason}); "
                         "re-encode the file as UTF-8") from None


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse numbers that cannot work and an output path that cannot be written, before any query runs."""
    if not 0 < args.timeout < math.inf:  # NaN fails too: a NaN deadline never comes
        parser.error(f"--timeout {args.timeout}: must be a finite number of seconds > 0")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers {args.workers}: must be >= 1 (leave it out to use every core)")
    if args.out is not None:
        if args.out.is_dir():
            parser.error(f"--out {args.out}: is a directory; give a file path such as {args.out / 'verdicts.jsonl'}")
        folder = args.out.parent
        if not folder.is_dir():
            parser.error(f"--out {args.out}: folder {folder} does not exist; create it first")
        if not os.access(folder, os.W_OK):
            parser.error(f"--out {args.out}: folder {folder} is not writable")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sqlr1.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gold", type=Path, required=True, help="lines `SQL<TAB>db_id`")
    parser.add_argument("--pred", type=Path, required=True, help="one predicted SQL per line")
    parser.add_argument("--db_root", type=Path, required=True, help="folder holding <db_id>/<db_id>.sqlite")
    parser.add_argument("--mode", choices=MODES, default="spider")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per query")
    parser.add_argument("--keep_distinct", action="store_true", help="spider mode: do not strip DISTINCT")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    parser.add_argument("--out", type=Path, default=None, help="write one JSON verdict per pair here")
    args = parser.parse_args(argv)
    _check_args(parser, args)
    try:
        pairs = read_pairs(args.gold, args.pred)
        db_paths = [resolve_db(args.db_root, db_id) for _, _, db_id in pairs]
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not pairs:
        print(f"error: nothing to score: {args.gold} has no `SQL<TAB>db_id` line", file=sys.stderr)
        return 2

    with Sandbox(args.workers, timeout=args.timeout) as sandbox:
        verdicts = score_pairs(sandbox, [p for p, _, _ in pairs], [g for _, g, _ in pairs], db_paths,
                               mode=args.mode, keep_distinct=args.keep_distinct, progress=True)
    if args.out is not None:
        with open(args.out, "w", encoding="utf-8") as f:
            for index, ((_, _, db_id), v) in enumerate(zip(pairs, verdicts)):
                f.write(json.dumps({"index": index, "db_id": db_id, "match": v.match,
                                    "pred_status": v.pred.status, "gold_status": v.gold.status}) + "\n")

    n = len(verdicts)
    matches = sum(v.match for v in verdicts)
    print(f"EX ({args.mode} rules): {matches / max(n, 1):.4f}  ({matches}/{n})")
    print(f"gold errors: {sum(v.gold_error for v in verdicts)} (never counted as matches)  "
          f"pred errors: {sum(v.pred.status == 'error' for v in verdicts)}  "
          f"pred timeouts: {sum(v.pred.status == 'timeout' for v in verdicts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
