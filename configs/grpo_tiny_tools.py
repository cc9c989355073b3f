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
single-turn baseline of the comparison is this config with --max_turns=0 --sft_split=sft_tools_blind (whose teacher
answers lookups in one turn with the LIKE filter).
"""

from sqlr1.config import TrainConfig
from sqlr1.grpo import GRPOConfig
from sqlr1.reward import RewardConfig

config = TrainConfig(  # configs/grpo_tiny.py's settings, with the lines marked "tools" changed
    name="grpo_tiny_tools",
    dataset="toy",
    data_root="toyworld",
    model="",
    device="cpu",
    dtype="float32",
    gradient_checkpointing=False,
    prompt_template="short",
    max_prompt_len=512,
    max_response_len=192,  # tools: room for a query and its observation before a ~110-token answer
    train_split="train_tools",  # tools
    sft_split="sft_tools",  # tools
    eval_split="dev_tools",  # tools
    sft_steps=600,
    sft_lr=4e-3,
    sft_batch_size=32,
    micro_batch_size=16,
    grpo_steps=100,
    prompts_per_step=8,
    group_size=8,
    lr=2e-4,
    temperature=1.0,
    grpo=GRPOConfig(kl_coef=0.0),
    reward=RewardConfig(),
    lr_schedule="constant",
    warmup_steps=5,
    eval_n=8,
    # multi-turn widens the shared KV cache by each pause step's longest observation (sqlr1/sampling.py), for all
    # rows of a call: bounded batches, not all 308 held-out prompts x 8 votes at once
    eval_batch_size=32,
    eval_temperature=0.8,
    sandbox_workers=2,
    max_turns=3,  # tools
    obs_rows=3,  # tools
    obs_max_tokens=48,  # tools
)
