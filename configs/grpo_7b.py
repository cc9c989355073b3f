"""SQL-R1's GRPO recipe: Qwen2.5-Coder-7B-Instruct, 8 x 80 GB GPUs.

    torchrun --nproc_per_node=8 train.py --config configs/grpo_7b.py --data_root=/data/spider
    # multi-node: torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...

Memory budget per GPU (8 ranks, FSDP2 full sharding, P = 7.6e9 parameters):
    policy master weights, fp32, sharded      4 B * P / 8  =  3.8 GB
    gradients, fp32, sharded                  4 B * P / 8  =  3.8 GB
    AdamW m and v, fp32, sharded              8 B * P / 8  =  7.6 GB
    reference model, bf16, sharded            2 B * P / 8  =  1.9 GB
    rollout copy, bf16, full (per rank)       2 B * P      = 15.2 GB
    KV cache: 1 prompt x G=8 rows x (4096 + 2048) tokens x 28 layers x 2 (K, V) x 4 KV heads x 128 x 2 B
                                                           =  2.8 GB   (freed before the policy update)
    activations, micro-batch 4 x 6144 tokens, checkpointed per block:
        block inputs 4 * 6144 * 3584 * 2 B * 28 layers     =  4.9 GB
        one block recomputed (MLP 18944 wide, attention) ~  3   GB
        log-probs: chunks of 1024 positions x 152k vocab fp32, recomputed in backward  <  1 GB
    all-gathered bf16 block weights in flight (FSDP prefetch) ~ 1 GB
    total                                                  ~ 43 GB  of 80 GB
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
    grad_accum_no_sync=False,  # no-sync holds the unsharded fp32 gradient (28 GiB per GPU) through the loop
    ppo_epochs=1,
    lr=3e-7,
    temperature=1.1,
    grpo=GRPOConfig(kl_coef=0.001, clip_low=0.2, clip_high=0.2, loss_agg="token-mean"),
    reward=RewardConfig(timeout=30.0),
    grad_clip=1.0,
    gradient_checkpointing=True,
    eval_every=50,
    eval_batch_size=8,  # prompts per generate call: the dry run's largest that fits 8 x 80 GB (all 63 at once: 206 GiB)
    save_every=50,
)
