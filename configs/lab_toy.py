"""The built-in RL lab: 11 variants x 3 seeds of the toy demo (configs/grpo_tiny.py), SFT cached once per seed.

    python -m sqlr1.lab --config configs/lab_toy.py            # OUT = runs/lab_toy: lab.md, lab.json, lab.png

Every row starts from the same SFT weights per seed (paired gains). Lab-wide: held-out greedy EX every 25 GRPO steps
for the curve, voting (8 candidates) only after the last step (eval_vote=final), and the SFT run never
re-evaluated at GRPO step 0 (the SFT row comes from the cached SFT run's own end-of-SFT evaluation).

The cold start is the noisy teacher's (sft_split=sft_noisy, toyworld.teacher_plural_slip): sft.json's traces, 40 %
of them with plural table names that fail to execute. With sft.json (every slip runs) nearly every GRPO group
executes throughout, where S_r is redundant under group-std advantages (S_l, paid only when correct, ranks the
group the same way), and the lab could not tell the full reward from the S_r ablation (RESULTS.md: 0.232
[0.120, 0.343] vs 0.168 [-0.105, 0.441] over 3 seeds). With failing samples in the groups, the rewards differ where
the ablation matters: without S_r a wrong query that runs earns 3 of a right one's ~4 points, and errors -1.

SFT runs 900 steps here, not grpo_tiny's 600: at 600 the seeds' SFT models are at different points of learning (SFT
loss 0.15 / 0.11 / 0.12, still falling) and the full reward's GRPO stage ends at 0.35 / 0.47 / 0.47 held-out EX
(interval +-0.17 over 3 seeds); from 900 it ends at 0.530 / 0.515 / 0.523 ([0.504, 0.541]), so a row differs from
the reference by what it changes rather than by which seed it drew (RESULTS.md, "RL lab", fifth session). There
S_e off falls clearly below the full reward; S_r off trails it by ~25 GRPO steps and its interval still overlaps.

Why S_r off is only a delay under SQL-R1's GRPO, and why the lab also runs it under Dr.GRPO: the group-std
division A_i = (r_i - mean_g) / std_g erases the reward's scale, so in a group whose samples all run, S_l's ~0.8
points for a right answer (mean over the grpo run, seed 0) rank it exactly as S_r + S_l's 6.8 do. Without the
division (A_i = r_i - mean_g) the scale stays: S_r off leaves 0.8 points for being right against 4 for running, all
through training, and it costs 0.16-0.21 EX after 100 steps on every seed (dr_grpo vs dr_grpo_no_result).
configs/lab_ablation.py adds a cold start in which the result reward has the most to do.

Rows:
- grpo: SQL-R1 as grpo_tiny runs it (token-mean, eps 0.2, group-std advantages, beta 0).
- dr_grpo: Dr.GRPO, A_i = r_i - mean_g (no std division), seq-mean-token-sum-norm aggregation.
- dr_grpo_no_result: dr_grpo with S_r off: the result ablation where the advantage keeps the reward's scale.
- dapo: DAPO's clip-higher (eps_high 0.28) and dynamic-sampling filter (zero-std groups dropped), token-mean.
- gspo: GSPO's sequence ratio s_i = exp(mean_t log rho_i,t) with its clip range (3e-4, 4e-4) and its sequence-mean
  objective. At ppo_epochs=1 with pi_old recomputed, s_i = 1 exactly and GSPO-token's gradient equals GRPO's
  with the same aggregation (the clip never acts), so this row runs ppo_epochs=2: the second pass is where the
  sequence-level clip matters (it also pays one more forward/backward per step).
- no_format / no_execution / no_result / no_length: SQL-R1's ablations, one component off (S_f, S_e, S_r, S_l).
  Note for no_result: S_l is still paid only when the result is correct, so correctness is still rewarded
  through S_l (at most 0.5 + |q|/|answer| ~ 1 point, against S_r's 6-point swing): the ablation weakens the
  correctness signal rather than removing it, and only in groups whose samples do not all execute.
- arctic: Arctic-Text2SQL-R1's reward (1 correct, 0.1 runs, 0 otherwise; RewardConfig.preset="arctic").
- tis: truncated importance sampling, C = 2. In fp32 (this config's dtype) the sampler's and the trainer's
  log-probs agree to rounding, so every weight is ~1: this row is a control (it must match grpo within noise).
"""

from sqlr1.lab import LabConfig

DR_GRPO = ["--grpo.adv_scale=none", "--grpo.loss_agg=seq-mean-token-sum-norm"]

config = LabConfig(
    name="lab_toy",
    base="configs/grpo_tiny.py",
    base_overrides=["--eval_every=25", "--eval_vote=final", "--sft_split=sft_noisy", "--sft_steps=900"],
    seeds=[0, 1, 2],
    variants={
        "grpo": [],
        "dr_grpo": DR_GRPO,
        "dr_grpo_no_result": [*DR_GRPO, "--reward.use_result=false"],
        "dapo": ["--grpo.clip_high=0.28", "--grpo.drop_zero_std_groups=true", "--grpo.loss_agg=token-mean"],
        "gspo": ["--grpo.ratio_level=sequence", "--grpo.clip_low=3e-4", "--grpo.clip_high=4e-4",
                 "--grpo.loss_agg=seq-mean-token-mean", "--ppo_epochs=2"],
        "no_format": ["--reward.use_format=false"],
        "no_execution": ["--reward.use_execution=false"],
        "no_result": ["--reward.use_result=false"],
        "no_length": ["--reward.use_length=false"],
        "arctic": ["--reward.preset=arctic"],
        "tis": ["--grpo.tis_cap=2"],
    },
    # 2 runs at once, 1 thread each (sandbox_workers=1), not 1 run x 2 threads: one comparison (2 GRPO runs x 8 steps
    # from a 1-step SFT, 2026-12-01, Intel(R) Xeon(R) Processor, 2 cores, shared, load average ~5): jobs=2 77 s,
    # jobs=1 575 s (7.5x; 6.5 vs 30-35 s per GRPO step). A busy machine exaggerates it (2 OpenMP threads spin at
    # every barrier while other processes hold the cores); the toy model's matmuls are too small for 2 threads anyway.
    jobs=2,
    cache_dir="runs/lab_cache",
)
