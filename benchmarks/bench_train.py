"""Policy-update throughput: forward + backward + AdamW step of the GRPO loss, tokens/s.

    python benchmarks/bench_train.py                    # tiny CPU config (the toy demo's model size)
    python benchmarks/bench_train.py --device cuda      # Qwen2.5-1.5B shape, bf16 autocast, with MFU

Both sides train the same random weights on the same padded micro-batch: ours is `sqlr1.update.train_on_micro_batches`
(chunked log-probs, explicit masks, GRPO loss) + `sqlr1.update.optimizer_step`; the baseline is transformers'
Qwen2ForCausalLM with a full [B, T, V] log-softmax and the same loss. Prints tokens/s and the ratio.
"""

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlr1.batch import Sequence, collate  # noqa: E402
from sqlr1.config import TrainConfig  # noqa: E402
from sqlr1.distributed import Dist  # noqa: E402
from sqlr1.grpo import GRPOConfig, loss_norm, policy_loss  # noqa: E402
from sqlr1.model import ModelConfig, Qwen2, flops_per_token  # noqa: E402
from sqlr1.update import make_optimizer, optimizer_step, train_on_micro_batches  # noqa: E402

SHAPES = {
    "tiny": dict(vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
}


def batch(cfg: ModelConfig, rows: int, prompt: int, completion: int, device):
    g = torch.Generator().manual_seed(0)
    seqs = [Sequence(torch.randint(0, cfg.vocab_size, (prompt,), generator=g).tolist(),
                     torch.randint(0, cfg.vocab_size, (completion,), generator=g).tolist(),
                     [-3.0] * completion, advantage=float(i % 2) - 0.5) for i in range(rows)]
    return collate(seqs, pad_id=0, device=device)


def bench_ours(mcfg, mb, device, dtype, steps):
    model = Qwen2(mcfg).to(device)
    model.gradient_checkpointing = device.type == "cuda"
    tcfg = TrainConfig(lr=1e-5, grpo=GRPOConfig(kl_coef=0.0))
    opt, sched = make_optimizer(model, tcfg, 1e-5, 100)
    ctx = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    norm = loss_norm([mb.mask], 2048)

    def step():
        loss, _ = train_on_micro_batches(model, [mb], norm, tcfg, Dist(device=device), ctx, mcfg.vocab_size, sft=False)
        optimizer_step(model, opt, sched, tcfg, loss)

    return timed(step, steps, device)


def bench_transformers(mcfg, mb, device, dtype, steps):
    import transformers

    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**vars(mcfg))).to(device)
    if device.type == "cuda":
        hf.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-5)
    ctx = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    norm = loss_norm([mb.mask], 2048)
    gcfg = GRPOConfig(kl_coef=0.0)

    def step():
        with ctx:
            logits = hf(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[:, mb.start : -1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, mb.input_ids[:, mb.start + 1 :, None]).squeeze(-1)
        loss, _ = policy_loss(logp, mb.old_logp, None, mb.advantages, mb.mask, gcfg, norm)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, steps, device)


def timed(step, steps, device) -> float:
    step()  # warm-up
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    device = torch.device(args.device)
    shape, rows, prompt, completion = ("tiny", 16, 160, 48) if device.type == "cpu" else ("1.5b", 8, 1024, 512)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    mcfg = ModelConfig(**SHAPES[shape])
    mb = batch(mcfg, rows, prompt, completion, device)
    tokens = int(mb.attention_mask.sum())
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, shape {shape}, {rows} rows x "
          f"({prompt} prompt + {completion} completion) tokens, {dtype}")
    ours = bench_ours(mcfg, mb, device, dtype, args.steps)
    hf = bench_transformers(mcfg, mb, device, dtype, args.steps)
    print(f"{'':<14}{'s/step':>10}{'tokens/s':>12}")
    print(f"{'sqlr1':<14}{ours:>10.3f}{tokens / ours:>12.0f}")
    print(f"{'transformers':<14}{hf:>10.3f}{tokens / hf:>12.0f}")
    print(f"ratio sqlr1 / transformers: {hf / ours:.2f}x")
    if device.type == "cuda":
        peak = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12}.get(torch.cuda.get_device_name().split(" 80GB")[0], 989e12)
        flops = 3 * flops_per_token(mcfg, prompt + completion) * tokens  # forward + backward (2x)
        print(f"model FLOPs utilisation (bf16 dense peak {peak / 1e12:.0f} TFLOP/s): {flops / ours / peak:.1%}")


if __name__ == "__main__":
    main()
