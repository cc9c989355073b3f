"""Single-turn vs multi-turn GRPO on the toy world's lookup questions, 3 seeds, each row from its own cold start.

    python -m sqlr1.lab --config configs/lab_tools.py            # OUT = runs/lab_tools: lab.md, lab.json, lab.png

Base: configs/grpo_tiny_tools.py (the *_tools splits, whose lookup family names a row by a lower-case prefix of a
value the gold SQL needs verbatim). The rows differ in what SFT computes, so each gets its own cached SFT run per
seed (sqlr1.lab keys SFT by each variant's settings) and its gain is paired with that SFT:
- multi_turn: cold start on sft_tools (the teacher looks the value up with a <sql> query, observations masked out of
  the loss), GRPO with up to 3 queries per rollout.
- single_turn: cold start on sft_tools_blind (the same questions, the lookup answered in one turn with a LIKE
  filter), GRPO as SQL-R1 publishes it (max_turns=0).
The share of rollouts that query is in each multi_turn run's metrics.jsonl (query_rate per GRPO step).
"""

from sqlr1.lab import LabConfig

config = LabConfig(  # seeds 0, 1, 2, two runs at once (1 thread each): LabConfig's defaults
    name="lab_tools",
    base="configs/grpo_tiny_tools.py",
    base_overrides=["--sft_steps=600", "--grpo_steps=100"],  # the runs RESULTS.md measured
    variants={
        "multi_turn": [],
        "single_turn": ["--max_turns=0", "--sft_split=sft_tools_blind"],
    },
)
