"""The embedded default: the whole SQL-R1 pipeline on the toy world, on a laptop CPU in minutes.

    python train.py --config configs/grpo_tiny.py

Builds the toy world and a tiny Qwen2 model if missing (sqlr1/toyworld.py), then: cold-start SFT on an imperfect
teacher's traces (sft.json: gold answers with three habitual slips, see toyworld.teacher_answer) -> held-out
evaluation (greedy) -> GRPO with SQL-R1's execution reward through the real sandbox, on the train questions with
their gold SQL, greedy held-out EX every 25 steps -> held-out evaluation (greedy and 8-way voting). Same code paths as configs/grpo_7b.py; only the sizes differ.

SFT runs well past the point (~250-350 steps) where the tiny model learns to copy names from the question into the
SQL; before it, held-out EX is ~0 and GRPO has nothing to reinforce. Values are copied reliably later: at 600 steps
one seed in three still wrote other values than the question's and GRPO did not move it in 100 steps; at 750 it
does, and its held-out EX is still climbing at GRPO step 100, hence 120.
"""

from sqlr1.config import TrainConfig
from sqlr1.grpo import GRPOConfig
from sqlr1.reward import RewardConfig

config = TrainConfig(
    name="grpo_tiny",
    dataset="toy",
    data_root="toyworld",
    model="",  # "": the toy world's freshly initialised tiny model
    device="cpu",
    dtype="float32",
    gradient_checkpointing=False,
    prompt_template="short",
    max_prompt_len=512,
    max_response_len=128,  # hard JOIN answers reach ~110 tokens
    sft_split="sft",
    sft_steps=750,
    sft_lr=4e-3,
    sft_batch_size=32,
    micro_batch_size=16,
    grpo_steps=120,
    prompts_per_step=8,
    group_size=8,
    lr=2e-4,
    temperature=1.0,
    grpo=GRPOConfig(kl_coef=0.0),
    reward=RewardConfig(),
    lr_schedule="constant",
    warmup_steps=5,
    eval_every=25,  # greedy held-out EX every 25 GRPO steps: the curve in run.png
    eval_vote="final",  # 8-way voting once, after the last step
    eval_n=8,
    eval_batch_size=0,  # a tiny model on a CPU: all 266 held-out prompts in one generate call (voted KV cache <= 3 GB)
    eval_temperature=0.8,
    sandbox_workers=2,
)
