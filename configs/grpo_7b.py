"""SQL-R1's GRPO recipe: Qwen2.5-Coder-7B-Instruct, 8 x 80 GB GPUs.

    torchrun --nproc_per_node=8 train.py --config configs/grpo_7b.py --data_root=/data/spider
    # multi-node: torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...

Memory per GPU, from the dry run (`python train.py --config configs/grpo_7b.py --dry_run --gpus=8 --gpu_mem_gb=80`:
train.py's own phases under fake tensors and a fake process group of 8, torch's MemTracker, rank 0; GiB; each
generate phase includes the compaction that drops one finished row from the widest cache; sqlr1/dryrun.py says what
is simulated and what is assumed; benchmarks/RESULTS.md has 8 x 40 GB and 4 x 80 GB):

    phase        params  grads  AdamW  activ.  KV cache  temps  total
    build          28.7    0.0    0.0     0.0       0.0    0.0   28.7   fp32 policy loaded full, then sharded
    eval greedy    19.5    0.0    7.1     4.9       2.7    0.0   34.2   8 prompts per call (eval_batch_size)
    eval voted     19.5    0.0    7.1     0.4      21.4    0.0   48.4   8 x eval_n=8 rows
    rollout        19.5    0.0    7.1     0.1       2.7    0.0   29.3   1 prompt x G=8 rows per rank
    reference       6.3    0.0    7.1     4.5       0.0    0.0   17.9   rollout copy freed: params = shards
    update          8.5    0.0    7.1     7.4       0.0   16.8   39.8   micro-batch 4 x (4,096 + 2,048), shared prefix
    optimizer       7.1    3.5    7.1     0.0       0.0    3.5   21.3
    checkpoint      7.1    0.0    7.1     3.0       0.0    0.0   17.2   HF export gathered one tensor at a time

Peak: evaluation's voted pass, 48.4 of 72 GiB (80 less 10 % headroom); the largest sizes that fit are
micro_batch_size 8 (a rank's whole step in one micro-batch) and eval_batch_size 16 (voted pass 70.2 GiB). Parameters
include the bf16 rollout copy (14.2 GiB) only while it samples (rollouts, evaluation). Gradients are reduce-scattered
after every micro-batch (grad_accum_no_sync=False: no-sync would hold FSDP's unsharded fp32 gradient, 28 GiB, through
the loop). On CUDA, rollouts and evaluations decode with the compiled step (compile="auto"): the first rollout and the
first evaluation each pay a one-time compilation, logged.
"""

from sqlr1.config import TrainConfig
from sqlr1.grpo import GRPOConfig
from sqlr1.reward import RewardConfig

config = TrainConfig(
    name="grpo_7b",
    model="Qwen/Qwen2.5-Coder-7B-Instruct",  # or a local directory, e.g. the cold-start SFT output
    dtype="bfloat16",
    dataset="spider",  # SQL-R1 trains on SynSQL-Complex-5K (dataset="synsql"); Spider/BIRD train sets work too
    data_root="data/spider",
    train_split="train",
    eval_split="dev",
    eval_limit=500,
    prompt_template="sqlr1",
    sample_values=2,
    max_prompt_len=4096,
    max_response_len=2048,
    grpo_steps=300,
    prompts_per_step=8,  # B
    group_size=8,  # G
    micro_batch_size=4,
    ppo_epochs=1,
    lr=3e-7,
    temperature=1.1,
    grpo=GRPOConfig(kl_coef=0.001, clip_low=0.2, clip_high=0.2, loss_agg="token-mean"),
    reward=RewardConfig(timeout=30.0),
    grad_clip=1.0,
    gradient_checkpointing=True,
    grad_accum_no_sync=False,  # reduce-scatter per micro-batch: no unsharded fp32 gradient (~28 GiB) held
    recompute_old_logp=True,  # log pi_old from the trainer's forward, not the bf16 sampler's
    eval_every=50,
    eval_batch_size=8,  # prompts per generate call (the dry run's largest that fits 8 x 80 GB: 16)
    save_every=50,
)
