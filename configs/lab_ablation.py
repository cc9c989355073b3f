"""SQL-R1's result ablation as a check of the testbed: full reward vs S_r off, 3 seeds, in a world built for it.

    python -m sqlr1.lab --config configs/lab_ablation.py       # OUT = runs/lab_ablation: lab.md, lab.json, lab.png

SQL-R1 reports that removing the result reward S_r lowers EX. Two settings make that ablation bite on the toy world:

- The cold start (sft_careful, toyworld.teacher_careful_plural): the right idea often fails to run (plural table
  names in the teacher's careful answers, p = 0.6) while the habitual wrong one always runs. Without S_r a wrong
  query earns 3, a right one ~3.8, an error -1, so the right idea is worth 3.8 x 0.4 - 0.6 = 0.9 < 3 and GRPO is
  paid to retreat to the habit; with S_r it is worth 6.8 x 0.4 - 0.6 = 2.1.
- The advantage: Dr.GRPO's A_i = r_i - mean_g keeps the reward's scale, so S_r off leaves 0.8 points for being
  right against 4 for running. SQL-R1's A_i = (r_i - mean_g) / std_g erases it: once a group's samples all run,
  S_l's 0.8 points rank right above wrong as S_r + S_l's 6.8 do, and S_r off is only a delay.

Rows: dr_grpo / dr_grpo_no_result (the check) and grpo / no_result (the same pair under group-std GRPO, for
contrast). Everything else is configs/lab_toy.py's recipe. Results: benchmarks/RESULTS.md ("RL lab").
"""

from sqlr1.lab import LabConfig

DR_GRPO = ["--grpo.adv_scale=none", "--grpo.loss_agg=seq-mean-token-sum-norm"]

config = LabConfig(  # seeds 0, 1, 2, two runs at once (1 thread each): LabConfig's defaults
    name="lab_ablation",
    base="configs/grpo_tiny.py",
    base_overrides=["--sft_split=sft_careful", "--sft_steps=900", "--grpo_steps=100"],
    variants={
        "dr_grpo": DR_GRPO,
        "dr_grpo_no_result": [*DR_GRPO, "--reward.use_result=false"],
        "grpo": [],
        "no_result": ["--reward.use_result=false"],
    },
)
