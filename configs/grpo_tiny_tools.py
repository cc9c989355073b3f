"""The toy demo with multi-turn rollouts: the model may query the database inside <think> before it answers.

    python train.py --config configs/grpo_tiny_tools.py

configs/grpo_tiny.py on the toy world's *_tools splits (sqlr1/toyworld.py): the usual questions plus a lookup
family whose question names a row by a lower-case prefix of its label ('zorb') while the gold SQL needs the stored
value ('Zorbani'). The cold start (sft_tools) shows the teacher querying for the value first:

    Look up the exact name.
    <sql>SELECT title FROM album WHERE title LIKE 'zorb%'</sql>
    <observation>                  <- appended by the environment (sqlr1/sql_env.py), masked out of every loss
    title
    Zorbani
    </observation>
    Filter album on it, return price.

GRPO then samples multi-turn episodes (max_turns > 0) and rewards the final answer with SQL-R1's reward. The
single-turn baseline is this config with --max_turns=0 --sft_split=sft_tools_blind (whose teacher answers lookups
in one turn with a LIKE filter).
"""

import dataclasses
import runpy
from pathlib import Path

base = runpy.run_path(str(Path(__file__).with_name("grpo_tiny.py")))["config"]

config = dataclasses.replace(  # grpo_tiny's settings; only these differ
    base,
    name="grpo_tiny_tools",
    train_split="train_tools",
    sft_split="sft_tools",
    eval_split="dev_tools",
    max_response_len=192,  # room for a query and its observation before a ~110-token answer
    max_turns=3,
    obs_rows=3,
    obs_max_tokens=48,
    # multi-turn widens the shared KV cache by each pause step's longest observation (sqlr1/sampling.py), for all
    # rows of a call: bounded batches, not all 308 held-out prompts x 8 votes at once
    eval_batch_size=32,
)
