"""Run under torchrun (see test_train.py): the RL data filter runs on rank 0 only and every rank gets its list.

Each rank points the same three examples at its own SQLite file, so the filter would keep different examples on
different ranks (as a gold timing out on one rank only would): rank 0's table has x = 1, 2, 3, rank 1's only x = 1,
which empties one gold's result there. Rank 0 writes, to the file given as argv[1], every rank's
(shared list, own list, cores_per_local_rank, usable cores, LOCAL_WORLD_SIZE).
"""

import json
import os
import sqlite3
import sys
from pathlib import Path

from sqlr1 import distributed
from sqlr1.config import TrainConfig
from sqlr1.data import Example, Prompt, filter_for_rl
from sqlr1.sandbox import Sandbox
from train import Split, rl_data


def main(out: str) -> None:
    d = distributed.setup("cpu")
    db = Path(out).with_name(f"rank{d.rank}.sqlite")
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE t (x INTEGER)")
        con.executemany("INSERT INTO t VALUES (?)", [(v,) for v in ((1, 2, 3) if d.rank == 0 else (1,))])
    golds = ["SELECT x FROM t WHERE x > 1", "SELECT x FROM t", "SELECT nope FROM t"]
    examples = [Example(f"q{i}", "db", db, sql) for i, sql in enumerate(golds)]
    prompts = [Prompt("p", [1, 2, 3], []) for _ in examples]
    cfg = TrainConfig(max_prompt_len=16)
    with Sandbox(num_workers=1, timeout=10.0) as sandbox:
        own, _ = filter_for_rl(examples, prompts, sandbox, cfg.max_prompt_len, timeout=10.0)
        kept = rl_data(Split(examples, prompts), sandbox, cfg, d)
    shared = [examples.index(ex) for ex in kept.examples]
    cores = len(os.sched_getaffinity(0))
    mine = {"shared": shared, "own": own, "workers": distributed.cores_per_local_rank(),
            "cores": cores, "local_world_size": int(os.environ["LOCAL_WORLD_SIZE"])}
    everyone = distributed.all_gather_objects(mine)
    if d.is_main:
        Path(out).write_text(json.dumps(everyone))
    distributed.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
    os._exit(0)  # as dist_split.py: skip gloo's occasionally noisy interpreter teardown
