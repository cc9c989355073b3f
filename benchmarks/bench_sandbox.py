"""Benchmark the SQL sandbox against plain in-process serial sqlite3 on the same work.

(a) raw execution: the Spider dev gold queries (those whose database is present) executed 8 times each, in
    round-robin order, through `Sandbox.execute_many` (no result cache, no de-duplication) vs a serial loop of
    `sqlite3.connect(mode=ro).execute(sql).fetchall()` that keeps one connection per database. Both read the
    committed state; a serial loop with `immutable=1` (no locks and no change checks: it can read stale or
    half-written data, so the sandbox does not use it) shows what that costs.
(b) one GRPO step: 64 prompts x 8 rollouts that repeat each other as real rollouts do, scored by
    `reward.score_batch` (one execute_many, de-duplication, gold cache) vs the same parsing / comparison / reward
    code with every pred and gold executed serially. Cold (empty gold cache) and warm (golds already cached).
(c) deadlines: a runaway recursive CTE (stopped by the progress handler) and a single C-level operation (stopped by
    killing the worker), with timeout = 1 s.
(d) start-up: a pool's first answer, and what a `spawn` worker would pay instead of a fork from the forkserver.

Each figure is the best of --repeat interleaved runs (the machine may be shared).

    python benchmarks/bench_sandbox.py [--spider ../shared/data/spider] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlr1.evaluate import normalize_sql, order_matters, results_match  # noqa: E402
from sqlr1.reward import RewardConfig, compute_reward, parse_response, score_batch  # noqa: E402
from sqlr1.sandbox import ExecResult, Sandbox, resolve_db  # noqa: E402

DEFAULT_SPIDER = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "spider"


def load_gold(spider: Path) -> list[tuple[str, str]]:
    """(db_path, gold_sql) for every dev_gold.sql line whose database exists."""
    pairs = []
    for line in (spider / "dev_gold.sql").read_text().splitlines():
        if line.strip():
            sql, db_id = line.rsplit("\t", 1)
            try:
                pairs.append((str(resolve_db(spider / "database", db_id)), sql))
            except FileNotFoundError:
                continue
    return pairs


class SerialSQLite:
    """The baseline: plain sqlite3 in this process, one read-only connection per database, one query at a time."""

    def __init__(self, uri_options: str = "mode=ro"):
        self.uri_options = uri_options
        self.connections: dict[str, sqlite3.Connection] = {}

    def connect(self, db_path: str) -> sqlite3.Connection:
        if db_path not in self.connections:
            self.connections[db_path] = sqlite3.connect(f"file:{db_path}?{self.uri_options}", uri=True)
        return self.connections[db_path]

    def run(self, db_path: str, sql: str) -> list[tuple]:
        return self.connect(db_path).execute(sql).fetchall()

    def result(self, db_path: str, sql: str) -> ExecResult:
        try:
            cursor = self.connect(db_path).execute(sql)
            return ExecResult("ok", rows=cursor.fetchall(), ncols=len(cursor.description or ()))
        except sqlite3.Error as e:
            return ExecResult("error", error=str(e))


def best_of(repeat: int, *runs):
    """Interleave the runs `repeat` times; return the best (shortest) wall time of each."""
    best = [float("inf")] * len(runs)
    for _ in range(repeat):
        for k, run in enumerate(runs):
            start = time.perf_counter()
            run()
            best[k] = min(best[k], time.perf_counter() - start)
    return best


def rollouts(prompts: list[tuple[str, str]], rng: random.Random, group: int = 8):
    """A GRPO batch: each prompt's G rollouts drawn from a few variants, so identical SQL recurs as it does in
    real groups (mostly the same right answer, some wrong, some broken, a few malformed)."""
    responses, golds = [], []
    for db_path, sql in prompts:
        variants = [
            (sql, 3),  # the gold query itself
            (" ".join(sql.split()), 1),  # same query, other whitespace
            (f"SELECT * FROM ({sql}) LIMIT 1", 2),  # executes, usually wrong
            (sql.replace("FROM", "FORM", 1), 1),  # syntax error
            (None, 1),  # malformed completion
        ]
        for _ in range(group):
            choice = rng.choices([v for v, _ in variants], weights=[w for _, w in variants])[0]
            think = "Let me look at the schema. " * rng.randrange(5, 40)
            if choice is None:
                responses.append(f"{think}<answer>```sql\n{sql}\n```</answer>")  # no </think>
            else:
                responses.append(f"{think}</think>\n<answer>\n```sql\n{choice}\n```\n</answer>")
            golds.append((db_path, sql))
    return responses, golds


def serial_score(baseline: SerialSQLite, responses, golds, cfg: RewardConfig):
    """The same reward, with every gold and every well-formed pred executed one after the other."""
    rewards = []
    for text, (db_path, gold_sql) in zip(responses, golds):
        parsed = parse_response(text)
        gold = baseline.result(db_path, normalize_sql(gold_sql))
        pred = baseline.result(db_path, normalize_sql(parsed.sql)) if parsed.format_ok else None
        match = pred is not None and results_match(pred, gold, cfg.mode, order_matters(gold_sql))
        rewards.append(compute_reward(parsed, pred.status if pred else None, match, cfg, not gold.ok))
    return rewards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spider", type=Path, default=DEFAULT_SPIDER)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    if not (args.spider / "dev_gold.sql").is_file():
        sys.exit(f"error: {args.spider}/dev_gold.sql not found: pass --spider DIR (the Spider data folder)")

    start = time.perf_counter()
    sandbox = Sandbox(args.workers, timeout=30.0)
    sandbox.execute_many([(":memory:", "SELECT 1")])
    pool_start = time.perf_counter() - start
    gold = load_gold(args.spider)
    baseline = SerialSQLite()
    print(f"{os.cpu_count()} cores, {sandbox.num_workers} workers, load average {os.getloadavg()[0]:.2f}, "
          f"sqlite {sqlite3.sqlite_version}, best of {args.repeat} interleaved runs")

    # (a) raw execution
    work = [item for _ in range(8) for item in gold]
    sandbox.execute_many(gold)
    for db_path, sql in gold:
        baseline.run(db_path, sql)
    immutable = SerialSQLite("mode=ro&immutable=1")
    t_serial, t_immutable, t_pool = best_of(
        args.repeat,
        lambda: [baseline.run(db, sql) for db, sql in work],
        lambda: [immutable.run(db, sql) for db, sql in work],
        lambda: sandbox.execute_many(work))
    n = len(work)
    print(f"\n(a) raw execution: {len(gold)} Spider dev gold queries x 8 = {n}, no result cache, no de-duplication")
    print(f"  serial sqlite3                    {n / t_serial:9.0f} queries/s")
    print(f"  serial sqlite3, immutable=1       {n / t_immutable:9.0f} queries/s   (unsafe: no locks)")
    print(f"  Sandbox.execute_many              {n / t_pool:9.0f} queries/s")
    print(f"  ratio vs serial                   {t_serial / t_pool:9.2f}x   (target >= 1.5x)")
    print(f"  ratio vs serial immutable=1       {t_immutable / t_pool:9.2f}x")

    # (b) one GRPO step
    cfg = RewardConfig()
    prompts = random.Random(0).sample(gold, 64)
    responses, golds = rollouts(prompts, random.Random(1))
    responses_next, _ = rollouts(prompts, random.Random(2))  # the next step on the same prompts
    assert serial_score(baseline, responses, golds, cfg) == score_batch(sandbox, responses, golds, cfg, gold_cache={})
    unique = len({(db, parse_response(r).sql) for r, (db, _) in zip(responses, golds) if parse_response(r).format_ok})
    warm_cache: dict = {}
    score_batch(sandbox, responses, golds, cfg, gold_cache=warm_cache)
    t_serial, t_cold, t_warm = best_of(
        args.repeat,
        lambda: serial_score(baseline, responses, golds, cfg),
        lambda: score_batch(sandbox, responses, golds, cfg, gold_cache={}),
        lambda: score_batch(sandbox, responses_next, golds, cfg, gold_cache=warm_cache))
    print(f"\n(b) one GRPO step: 64 prompts x 8 rollouts = {len(responses)} responses, "
          f"{unique} distinct well-formed preds, 64 golds")
    print(f"  serial (parse, execute each pred and gold, compare)   {len(responses) / t_serial:8.0f} responses/s"
          f"  {t_serial * 1e3:7.1f} ms")
    print(f"  score_batch, cold gold cache                          {len(responses) / t_cold:8.0f} responses/s"
          f"  {t_cold * 1e3:7.1f} ms  ({t_serial / t_cold:.2f}x)")
    print(f"  score_batch, warm gold cache                          {len(responses) / t_warm:8.0f} responses/s"
          f"  {t_warm * 1e3:7.1f} ms  ({t_serial / t_warm:.2f}x)")

    # (c) deadlines
    db_path = gold[0][0]
    print("\n(c) deadlines, timeout = 1 s, grace = 0.5 s")
    for name, sql in [("runaway recursive CTE (progress handler)",
                       "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"),
                      ("single C-level operation (worker killed)",
                       "SELECT instr(hex(zeroblob(5000000)), hex(zeroblob(2500000)) || 'x')")]:
        start = time.perf_counter()
        [result] = sandbox.execute_many([(db_path, sql)], timeout=1.0)
        print(f"  {name:42s} {result.status:8s} returned after {time.perf_counter() - start:.3f} s")
    start = time.perf_counter()
    sandbox.execute_many([(db_path, "SELECT 1")] * sandbox.num_workers)
    print(f"  next query after the kill (fresh worker)  {(time.perf_counter() - start) * 1e3:.1f} ms")
    sandbox.close()

    # (d) start-up: forkserver (chosen) vs what spawn would pay per worker and per respawn
    start = time.perf_counter()
    with Sandbox(args.workers) as second:
        second.execute_many([(":memory:", "SELECT 1")] * second.num_workers)
        second_start = time.perf_counter() - start
    print(f"\n(d) start-up: first pool (starts the forkserver) {pool_start * 1e3:.0f} ms, "
          f"another pool (forks only) {second_start * 1e3:.0f} ms")
    for module in ("sqlr1.sandbox", "torch"):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
        print(f"  a spawned worker pays interpreter start + import {module}: {(time.perf_counter() - start) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
