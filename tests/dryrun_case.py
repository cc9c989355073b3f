"""The dry run's tiny case, shared by test_dryrun.py and its torchrun worker (dryrun_worker.py): a shape big enough
that weights and activations dominate the few allocations the two runs may place differently."""

from sqlr1.config import TrainConfig
from sqlr1.dryrun import Plan, eval_batch_of
from sqlr1.grpo import GRPOConfig
from sqlr1.model import ModelConfig

WORLD = 2
VOCAB = 4000
MODEL = ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=3,
                    num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
CONFIG = TrainConfig(model="unused", dtype="bfloat16", max_prompt_len=96, max_response_len=64, prompts_per_step=4,
                     group_size=4, micro_batch_size=2, eval_limit=8, eval_n=4, grpo_steps=1,
                     grpo=GRPOConfig(kl_coef=0.001), recompute_old_logp=True,
                     ppo_epochs=2)  # ppo_epochs > 1: the old-logp forward is a phase of its own


def plan() -> Plan:
    return Plan(micro_batch_size=CONFIG.micro_batch_size, eval_batch=eval_batch_of(CONFIG, WORLD))


def checkpoint_model():
    """A small model whose largest parameter is a small part of it (the streamed save holds one at a time)."""
    import torch

    from sqlr1.model import Qwen2

    model = Qwen2(ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    model.init_weights(std=0.05, generator=torch.Generator().manual_seed(0))
    return model
