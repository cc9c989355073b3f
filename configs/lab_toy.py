"""The built-in RL lab: 13 variants x 3 seeds of the toy demo (configs/grpo_tiny.py), SFT cached once per seed.

    python -m sqlr1.lab --config configs/lab_toy.py            # OUT = runs/lab_toy: lab.md, lab.json, lab.png

Every row starts from the same SFT weights per seed, so gains are paired. It compares GRPO's published variants
and SQL-R1's reward ablations on one world; results and plots are in benchmarks/RESULTS.md ("RL lab").

- Cold start sft_noisy (toyworld.teacher_plural_slip): 40 % of the traces use plural table names, which fail to
  run. If every sample runs, group-std advantages rank a group the same with or without S_r (S_l, paid only when
  correct, already orders it), and the result ablation cannot show.
- 900 SFT steps (grpo_tiny: 750): the SFT loss has levelled off on every seed, so a row differs from the
  reference by what it changes, not by which seed it drew.
- The curves: greedy EX every 25 GRPO steps, voting after the last (grpo_tiny's eval_every and eval_vote).
- dr_grpo_no_result: the result ablation under A_i = r_i - mean_g, which keeps the reward's scale; under SQL-R1's
  A_i = (r_i - mean_g) / std_g (no_result) it is only a delay.
"""

from sqlr1.lab import LabConfig

DR_GRPO = ["--grpo.adv_scale=none", "--grpo.loss_agg=seq-mean-token-sum-norm"]

config = LabConfig(  # seeds 0, 1, 2, two runs at once (1 thread each): LabConfig's defaults
    name="lab_toy",
    base="configs/grpo_tiny.py",
    base_overrides=["--sft_split=sft_noisy", "--sft_steps=900", "--grpo_steps=100"],
    variants={
        "grpo": [],  # SQL-R1 as grpo_tiny runs it: token-mean, eps 0.2, group-std advantages, beta 0
        "dr_grpo": DR_GRPO,  # Dr.GRPO: no std division, seq-mean-token-sum-norm
        "dr_grpo_no_result": [*DR_GRPO, "--reward.use_result=false"],
        "dapo": ["--grpo.clip_high=0.28", "--grpo.drop_zero_std_groups=true", "--grpo.loss_agg=token-mean"],
        # GSPO: sequence-level ratio and clip; 2 epochs, since in the first the ratio is exactly 1 (pi_old recomputed)
        "gspo": ["--grpo.ratio_level=sequence", "--grpo.clip_low=3e-4", "--grpo.clip_high=4e-4",
                 "--grpo.loss_agg=seq-mean-token-mean", "--ppo_epochs=2"],
        "no_format": ["--reward.use_format=false"],  # SQL-R1's ablations: one reward component off
        "no_execution": ["--reward.use_execution=false"],
        "no_result": ["--reward.use_result=false"],  # S_l still pays ~1 point only when correct
        "no_length": ["--reward.use_length=false"],
        "arctic": ["--reward.preset=arctic"],  # Arctic-Text2SQL-R1: 1 correct, 0.1 runs, 0 otherwise
        "tis": ["--grpo.tis_cap=2"],  # truncated IS, C = 2; a control in fp32 (every weight ~1)
        # CISPO and its reference at 2 epochs: in the first the ratio is 1 and CISPO's gradient equals GRPO's
        "grpo_ppo2": ["--ppo_epochs=2"],
        "cispo": ["--grpo.pg_term=cispo", "--ppo_epochs=2"],
    },
)
