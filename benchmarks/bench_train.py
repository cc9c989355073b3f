"""Policy-update throughput: forward + backward + AdamW step of the GRPO loss, tokens/s.

    python benchmarks/bench_train.py                    # tiny CPU config (the toy demo's model size)
    python benchmarks/bench_train.py --device cuda      # Qwen2.5-1.5B shape, bf16 autocast, with MFU

Both sides train the same random weights on the same padded micro-batch: ours is `sqlr1.update.accumulate_gradients`
(chunked log-probs, explicit masks, GRPO loss) + `sqlr1.update.optimizer_step`; the baseline is transformers'
Qwen2ForCausalLM with a full [B, T, V] log-softmax and the same loss. Prints tokens/s and the ratio.

    python benchmarks/bench_train.py --shared           # shared-prefix vs unshared update (TrainConfig.shared_prefix)

`--shared` times, side by side in one run (interleaved, best of --repeats), one GRPO update step
(`sqlr1.update.policy_update`: micro-batches, forward + backward + AdamW) with and without shared prefixes, at the toy
demo's shape (8 prompts x G = 8, ~206 prompt + ~35 completion tokens, 16 rows per micro-batch) and at a SQL-R1-like
shape scaled to a CPU (4 layers, P = 1,024, C = 128, G = 8); and the toy GRPO step end to end without the reward
(rollout with `sqlr1.sampling.generate` + update; the reward, the same in both modes, is ~1 % of the toy step).
"""

import argparse
import contextlib
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlr1.batch import TrainSequence, collate  # noqa: E402
from sqlr1.config import TrainConfig  # noqa: E402
from sqlr1.distributed import Dist, Models  # noqa: E402
from sqlr1.grpo import GRPOConfig, LossInputs, loss_norm, policy_loss  # noqa: E402
from sqlr1.model import ModelConfig, Qwen2, flops_per_token  # noqa: E402
from sqlr1.sampling import SamplingParams, generate  # noqa: E402
from sqlr1.update import (  # noqa: E402
    accumulate_gradients, grpo_objective, new_optimizer, optimizer_step, policy_update,
)

SHAPES = {
    "tiny": dict(vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
}


def batch(cfg: ModelConfig, rows: int, prompt: int, completion: int, device):
    """One padded micro-batch of random tokens; pi_old is the sampler's log-probs (recompute_old_logp=False)."""
    g = torch.Generator().manual_seed(0)
    seqs = [TrainSequence(torch.randint(0, cfg.vocab_size, (prompt,), generator=g).tolist(),
                          torch.randint(0, cfg.vocab_size, (completion,), generator=g).tolist(),
                          advantage=float(i % 2) - 0.5, sampler_logp=[-3.0] * completion) for i in range(rows)]
    mb = collate(seqs, pad_id=0, device=device)
    mb.old_logp = mb.sampler_logp
    return mb


def bench_ours(mcfg, mb, device, dtype, steps):
    model = Qwen2(mcfg).to(device)
    model.gradient_checkpointing = device.type == "cuda"
    tcfg = TrainConfig(lr=1e-5, grpo=GRPOConfig(kl_coef=0.0), recompute_old_logp=False)
    opt = new_optimizer(model, tcfg, "grpo")
    ctx = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    models = Models(policy=model, ref=None, rollout=model, autocast=ctx)
    objective = grpo_objective(tcfg, loss_norm([mb.mask], 2048), {})

    def step():
        loss, _ = accumulate_gradients(models, [mb], objective, tcfg.temperature, True, mcfg.vocab_size, tcfg,
                                       Dist(device=device))
        optimizer_step(model, opt, tcfg, loss)

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
        loss, _ = policy_loss(LossInputs(logp, mb.old_logp, mb.advantages, mb.mask), gcfg, norm)
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


def grouped(cfg: ModelConfig, prompts: int, G: int, prompt_len: tuple[int, int], completion_len: tuple[int, int],
            seed: int = 0) -> list[TrainSequence]:
    """prompts x G rollouts (prompt-major, TrainSequence.group set) with lengths drawn uniformly from the given
    ranges; the sampler's log-probs stand in for pi_old."""
    g = torch.Generator().manual_seed(seed)

    def draw(lo_hi):
        return int(torch.randint(lo_hi[0], lo_hi[1] + 1, (1,), generator=g))

    seqs = []
    for p in range(prompts):
        prompt = torch.randint(1, cfg.vocab_size, (draw(prompt_len),), generator=g).tolist()
        for i in range(G):
            n = draw(completion_len)
            seqs.append(TrainSequence(prompt, torch.randint(1, cfg.vocab_size, (n,), generator=g).tolist(),
                                      advantage=float(i % 2) - 0.5, sampler_logp=[-3.0] * n, group=p))
    return seqs


def update_step(models: Models, opt, tcfg: TrainConfig, seqs: list[TrainSequence], shared: bool) -> None:
    """One GRPO optimisation step over `seqs` as train.py's grpo_step runs it (`policy_update`, no reference model,
    pi_old the sampler's log-probs); `shared` sets TrainConfig.shared_prefix. The token ids are random: the
    "tokenizer" is the pad id and the vocabulary size."""
    ids = SimpleNamespace(pad_id=0, vocab_size=models.policy.config.vocab_size)
    policy_update(models, opt, seqs, ids, replace(tcfg, shared_prefix=shared), Dist())


def bench_shared(steps: int, repeats: int) -> None:
    """Shared-prefix vs unshared update time per step, and the toy GRPO step end to end (module docstring)."""
    sqlr1_like = dict(SHAPES["tiny"], hidden_size=256, intermediate_size=768, num_attention_heads=8)
    cases = [  # name, model shape, prompts, G, prompt lengths, completion lengths, micro_batch_size
        ("toy", SHAPES["tiny"], 8, 8, (180, 230), (20, 50), 16),
        ("sql-r1-like", sqlr1_like, 2, 8, (1024, 1024), (128, 128), 8),
    ]
    print(f"{'shape':<14}{'rows x (P + C)':>18}{'tokens':>9}{'shared tok':>11}{'unshared s':>12}{'shared s':>10}"
          f"{'speed-up':>10}")
    for name, shape, prompts, G, plen, clen, mbs_size in cases:
        mcfg = ModelConfig(**shape)
        torch.manual_seed(0)
        model = Qwen2(mcfg)
        model.init_weights(generator=torch.Generator().manual_seed(0))
        tcfg = TrainConfig(lr=1e-5, grpo=GRPOConfig(kl_coef=0.0), micro_batch_size=mbs_size, max_response_len=clen[1],
                           recompute_old_logp=False)
        models = Models(policy=model, ref=None, rollout=model, autocast=contextlib.nullcontext())
        opt = new_optimizer(model, tcfg, "grpo")
        seqs = grouped(mcfg, prompts, G, plen, clen)
        tokens = sum(len(s.prompt) + len(s.completion) for s in seqs)
        shared_tokens = sum(len(s.completion) for s in seqs) + sum(len(seqs[p * G].prompt) for p in range(prompts))
        best = {False: float("inf"), True: float("inf")}
        for _ in range(repeats):
            for shared in (False, True):
                best[shared] = min(best[shared], timed(lambda: update_step(models, opt, tcfg, seqs, shared),
                                                       steps, torch.device("cpu")))
        mean_p = sum(len(s.prompt) for s in seqs) / len(seqs)
        mean_c = sum(len(s.completion) for s in seqs) / len(seqs)
        print(f"{name:<14}{f'{len(seqs)} x ({mean_p:.0f} + {mean_c:.0f})':>18}{tokens:>9}{shared_tokens:>11}"
              f"{best[False]:>12.3f}{best[True]:>10.3f}{best[False] / best[True]:>9.2f}x")

    # The toy GRPO step end to end (rollout + update; reward left out): the toy demo's sizes, fixed-length rollouts.
    mcfg = ModelConfig(**SHAPES["tiny"])
    model = Qwen2(mcfg)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    tcfg = TrainConfig(lr=1e-5, grpo=GRPOConfig(kl_coef=0.0), micro_batch_size=16, max_response_len=35,
                       recompute_old_logp=False)
    models = Models(policy=model, ref=None, rollout=model, autocast=contextlib.nullcontext())
    opt = new_optimizer(model, tcfg, "grpo")
    prompts = [s.prompt for s in grouped(mcfg, 8, 1, (180, 230), (1, 1))]

    def grpo_step(shared: bool) -> None:
        with torch.no_grad():
            out = generate(model, prompts, 8, SamplingParams(max_new_tokens=35, temperature=1.0, seed=0),
                           progress=False)
        seqs = [TrainSequence(prompts[p], out.tokens[j], advantage=float(j % 2) - 0.5, sampler_logp=out.logprobs[j],
                              group=p) for j, p in enumerate(out.prompt_index)]
        update_step(models, opt, tcfg, seqs, shared)

    best = {False: float("inf"), True: float("inf")}
    for _ in range(repeats):
        for shared in (False, True):
            best[shared] = min(best[shared], timed(lambda: grpo_step(shared), steps, torch.device("cpu")))
    print(f"toy GRPO step, rollout (64 x 35 tokens) + update: unshared {best[False]:.3f} s, shared {best[True]:.3f} s, "
          f"speed-up {best[False] / best[True]:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--shared", action="store_true", help="shared-prefix vs unshared update (CPU)")
    ap.add_argument("--repeats", type=int, default=3, help="--shared: interleaved repeats, best kept")
    args = ap.parse_args()
    if args.shared:
        print(f"torch {torch.__version__}, cpu, {torch.get_num_threads()} threads, fp32, steps {args.steps}, best of "
              f"{args.repeats} interleaved repeats")
        return bench_shared(args.steps, args.repeats)
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
