"""Cold-start SFT (SQL-R1, Sec. 3.1): Qwen2.5-Coder-7B-Instruct on SynSQL reasoning traces, 8 x 80 GB GPUs.

    torchrun --nproc_per_node=8 train.py --config configs/sft_7b.py --data_root=/data/synsql

SQL-R1 fine-tunes on SynSQL-2.5M-style (question, schema, cot, sql) records with lr 5e-5 and batch size 1 per GPU;
the response is `cot </think> <answer> ```sql ...``` </answer>`. Then run configs/grpo_7b.py with
--model=runs/sft_7b-.../final.
"""

from sqlr1.config import TrainConfig

config = TrainConfig(
    name="sft_7b",
    model="Qwen/Qwen2.5-Coder-7B-Instruct",
    dtype="bfloat16",
    dataset="synsql",
    data_root="data/synsql",  # data.json (+ databases/<db_id>/<db_id>.sqlite)
    train_split="data",  # data.json / data.jsonl / data.parquet
    eval_split="",
    prompt_template="sqlr1",
    sample_values=2,
    max_prompt_len=4096,
    max_response_len=2048,
    sft_steps=5000,
    sft_lr=5e-5,
    sft_batch_size=1,
    micro_batch_size=1,
    lr_schedule="cosine",
    warmup_steps=100,
    grad_clip=1.0,
    gradient_checkpointing=True,
    save_every=1000,
)
