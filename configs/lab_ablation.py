"""SQL-R1's result ablation as a check of the testbed: full reward vs S_r off, 3 seeds, in a world built for it.

    python -m sqlr1.lab --config configs/lab_ablation.py       # OUT = runs/lab_ablation: lab.md, lab.json, lab.png

SQL-R1 reports that removing the result reward S_r lowers EX. In lab_toy's world it does not, at 100 GRPO steps:
S_l, paid only when the result is right, still carries the correctness bit, and under group-std advantages an
all-executing group is ranked the same with or without S_r, so S_r off is a ~25-step delay (RESULTS.md, "RL lab").
Two things make the ablation bite here, and each is named so a reader can see which does what:

- The world (sft_split=sft_careful, toyworld.teacher_careful_plural): the cold start's right idea often fails to
  run (plural table names in the teacher's careful answers) while its habitual wrong one always runs. Without S_r
  the wrong query earns 3, the right one ~3.8, an error -1, so a right idea that still fails with p = 0.6 is worth
  3.8 x 0.4 - 0.6 = 0.9 < 3 and GRPO is paid to retreat to the habit; with S_r, 6.8 x 0.4 - 0.6 = 2.1 > 0.
- The advantage: without the std division (Dr.GRPO, A_i = r_i - mean_g) the reward's scale reaches the gradient.
  With it (SQL-R1's GRPO) the retreat is temporary, since once the failures are gone S_l's 0.8 points rank right
  above wrong exactly as S_r's 6 do; without it S_r off leaves 0.8 points for being right against 4 for running.

Rows: dr_grpo / dr_grpo_no_result (Dr.GRPO's advantage and aggregation, full reward vs S_r off: the check) and
grpo / no_result (the same pair under SQL-R1's group-std GRPO, for contrast). The rest is lab_toy's recipe.
Measured (RESULTS.md, "RL lab", 3 seeds, 46.6 min from an empty cache on 2 cores): dr_grpo 0.492 [0.272, 0.713]
vs dr_grpo_no_result 0.226 [0.216, 0.235] held-out EX (S_r off never leaves its SFT level); grpo 0.424 [0.121,
0.726] vs no_result 0.342 [-0.095, 0.779] (under the std division the ablation is a delay).
"""

from sqlr1.lab import LabConfig

DR_GRPO = ["--grpo.adv_scale=none", "--grpo.loss_agg=seq-mean-token-sum-norm"]

config = LabConfig(
    name="lab_ablation",
    base="configs/grpo_tiny.py",
    base_overrides=["--eval_every=25", "--eval_vote=final", "--sft_split=sft_careful", "--sft_steps=900"],
    seeds=[0, 1, 2],
    variants={
        "dr_grpo": DR_GRPO,
        "dr_grpo_no_result": [*DR_GRPO, "--reward.use_result=false"],
        "grpo": [],
        "no_result": ["--reward.use_result=false"],
    },
    jobs=2,  # 2 runs at once, 1 thread each (configs/lab_toy.py says why)
    cache_dir="runs/lab_cache",
)
