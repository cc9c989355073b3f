"""Benchmark sqlr1.sampling.generate against transformers' generate on the same random Qwen2 weights.

Both sides decode the same batch for the same number of new tokens (no stop ids / eos, so every row runs to
max_new_tokens) with the same sampling settings, in the same process, and we print tokens/s and the ratio.
Also measured: prefill with prefix sharing (each prompt once, then its cache rows repeated G times) vs without.

    python benchmarks/bench_sampling.py                  # CPU: small 4-layer model
    python benchmarks/bench_sampling.py --device cuda    # GPU: Qwen2.5-0.5B and -7B shapes, bf16, batch 1 and 64

On GPU it also reports the achieved memory traffic of a decode step, (weight bytes + KV-cache bytes read) / step
time, against the copy bandwidth of the device (torch copy of a 1 GiB tensor, read + write bytes / time).
Eager, the sampler attends over the filled cache columns only (prompt + tokens so far), so a step reads on average
prompt_len + new_tokens / 2 columns of keys and values; compiled, it reads all of them (static shapes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlr1.checkpoint import config_to_hf  # noqa: E402
from sqlr1.model import KVCache, ModelConfig, Qwen2, num_params  # noqa: E402
from sqlr1.sampling import SamplingParams, generate  # noqa: E402

CPU_CONFIG = ModelConfig(
    vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=2, max_position_embeddings=4096,
)
QWEN25_05B = ModelConfig()  # the defaults are Qwen2.5-0.5B
QWEN25_7B = ModelConfig(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, tie_word_embeddings=False,
)


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def best_times(fns: dict, device: str | torch.device, repeats: int) -> dict:
    """Best wall time of each callable over `repeats` rounds, after one warm-up call each. The callables run
    interleaved (a, b, a, b, ...) so that a slow spell of a shared machine hits all of them alike."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def build_models(config: ModelConfig, device: str, dtype: torch.dtype):
    """Our Qwen2 with random weights, and a transformers Qwen2ForCausalLM holding a copy of the same weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.device(device):
        ours = Qwen2(config).to(dtype)
        ours.init_weights(generator=torch.Generator(device).manual_seed(0))
        hf = Qwen2ForCausalLM._from_config(Qwen2Config(**config_to_hf(config)), dtype=dtype)
    state = {("" if k.startswith("lm_head") else "model.") + k: v for k, v in ours.state_dict().items()}
    hf.load_state_dict(state, strict=True)
    return ours.eval(), hf.eval()


def bench_decode(ours, hf, batch: int, prompt_len: int, new_tokens: int, temperature: float, device: str,
                 repeats: int, compile: bool) -> dict:
    """Seconds for: transformers, ours, ours with max_new_tokens=1 (prefill); greedy when temperature == 0, else
    multinomial sampling at that temperature without truncation. No eos: every row makes new_tokens tokens."""
    vocab = ours.config.vocab_size
    prompts = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(1))
    ids = prompts.to(device)
    sampling = dict(do_sample=False)
    if temperature:
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)

    def run_hf():
        with torch.inference_mode():
            hf.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0, **sampling,
            )

    def run_ours(n=new_tokens):
        generate(ours, prompts.tolist(), 1, SamplingParams(max_new_tokens=n, temperature=temperature, seed=0,
                                                          compile=compile), progress=False)

    return best_times({"hf": run_hf, "ours": run_ours, "prefill": lambda: run_ours(1)}, device, repeats)


def bench_prefill_sharing(model, num_prompts: int, group: int, prompt_len: int, device: str, repeats: int):
    """Seconds for prefill + 1 token with and without prefix sharing."""
    vocab = model.config.vocab_size
    prompts = torch.randint(0, vocab, (num_prompts, prompt_len), generator=torch.Generator().manual_seed(2)).tolist()

    def run(share: bool):
        generate(model, prompts, group, SamplingParams(max_new_tokens=1, seed=0), share_prefix=share, progress=False)

    return best_times({"shared": lambda: run(True), "unshared": lambda: run(False)}, device, repeats)


def bench_prefill_columns(model, num_prompts: int, prompt_len: int, new_tokens: int, device: str, repeats: int):
    """Seconds for one prefill into a cache with room for `new_tokens` more columns: attending over the prompt
    columns only (what `generate` does) vs over the whole cache with the empty columns masked out."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (num_prompts, prompt_len), generator=generator)
    max_len = prompt_len + new_tokens - 1
    mask = torch.ones(num_prompts, max_len, dtype=torch.bool, device=device)

    def run(width: int):
        cache = KVCache(model.config, num_prompts, max_len, device=device, dtype=model.lm_head.weight.dtype)
        with torch.inference_mode():
            model.hidden_states(ids.to(device), mask[:, :width], kv_cache=cache,
                                cache_position=torch.arange(prompt_len, device=device))

    return best_times({"prompt": lambda: run(prompt_len), "cache": lambda: run(max_len)}, device, repeats)


def matmul_floor(model, batch: int, repeats: int) -> float:
    """Seconds per decode step spent in the weight matmuls alone: every projection of every layer and the head,
    applied to a [batch, hidden] input in a decode step's order, nothing else. Any engine that calls the same
    matmul kernels needs at least this per step; at small batch it is the time to stream the weights."""
    layers, c = model.layers, model.config
    x = torch.randn(batch, c.hidden_size, dtype=model.lm_head.weight.dtype)
    xi = torch.randn(batch, c.intermediate_size, dtype=x.dtype)

    def step():
        for layer in layers:
            a, m = layer.self_attn, layer.mlp
            for proj in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj):
                F.linear(x, proj.weight, proj.bias)
            F.linear(xi, m.down_proj.weight)
        F.linear(x, model.lm_head.weight)

    steps = 50
    with torch.inference_mode():
        return best_times({"floor": lambda: [step() for _ in range(steps)]}, "cpu", repeats)["floor"] / steps


def kv_cache_bytes(config: ModelConfig, batch: int, cache_len: int, dtype: torch.dtype) -> int:
    """Bytes of keys + values a decode step reads when it attends over `cache_len` columns."""
    elements = 2 * config.num_hidden_layers * batch * config.num_key_value_heads * cache_len * config.head_dim
    return elements * torch.tensor([], dtype=dtype).element_size()


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a device-to-device copy of a 1 GiB tensor (read + write)."""
    x = torch.empty(2**28, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    t = best_times({"copy": lambda: y.copy_(x)}, device, 5)["copy"]
    return 2 * x.numel() * x.element_size() / t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time generate(compile=True)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    if args.device == "cpu":
        run_cpu(args)
    else:
        run_cuda(args)


def run_cpu(args) -> None:
    batch, prompt_len, new_tokens = 16, 128, 128
    print(f"\nmodel: 4 layers, hidden 256, 8/2 heads, vocab 8192 ({num_params(Qwen2(CPU_CONFIG)) / 1e6:.1f}M params)")
    print(f"decode: {batch} prompts x {prompt_len} tokens, {new_tokens} new tokens each, best of {args.repeats}; "
          "both engines run in the row's dtype\n")
    print(f"| {'dtype':<8} | {'decoding':<17} | {'HF tok/s':>9} | {'sqlr1 tok/s':>11} | {'ratio':>6} | {'sqlr1 ms/step':>13} |")
    print(f"|{'-' * 10}|{'-' * 19}|{'-' * 11}|{'-' * 13}|{'-' * 8}|{'-' * 15}|")
    floors = []
    for dtype in (torch.float32, torch.bfloat16):
        ours, hf = build_models(CPU_CONFIG, "cpu", dtype)
        for name, temperature, compile in (
            ("sampling T=1", 1.0, False), ("greedy", 0.0, False), ("sampling, compile", 1.0, True)
        ):
            if compile and not args.compile:
                continue
            t = bench_decode(ours, hf, batch, prompt_len, new_tokens, temperature, "cpu", args.repeats, compile)
            tokens = batch * new_tokens
            step_ms = 1e3 * (t["ours"] - t["prefill"]) / (new_tokens - 1)
            print(f"| {str(dtype)[6:]:<8} | {name:<17} | {tokens / t['hf']:>9.0f} | {tokens / t['ours']:>11.0f} |"
                  f" {t['hf'] / t['ours']:>5.2f}x | {step_ms:>13.2f} |")
            if name == "sampling T=1":
                floor = matmul_floor(ours, batch, args.repeats)
                bound = t["hf"] / (t["prefill"] + (new_tokens - 1) * floor)
                floors.append(f"  {str(dtype)[6:]:<8} {1e3 * floor:5.2f} ms/step; bound on the sampling ratio: {bound:.2f}x")
    print("\nweight matmuls alone (matmul_floor), and the best ratio any engine calling these kernels could reach,"
          "\nHF time / (prefill + 127 x floor):")
    print("\n".join(floors))
    ours, hf = build_models(CPU_CONFIG, "cpu", torch.float32)
    t = bench_prefill_sharing(ours, 2, 8, 512, "cpu", args.repeats)
    print("\nprefill, 2 prompts x 512 tokens, G = 8 samples each (prefill + first token):")
    print(f"  shared prefix  {t['shared'] * 1e3:8.1f} ms\n  unshared       {t['unshared'] * 1e3:8.1f} ms"
          f"\n  speed-up       {t['unshared'] / t['shared']:8.2f}x")
    t = bench_prefill_columns(ours, 2, 512, 2048, "cpu", args.repeats)
    print("\nprefill, 2 prompts x 512 tokens into a cache with room for 2048 new tokens:")
    print(f"  over the prompt columns  {t['prompt'] * 1e3:8.1f} ms\n  over the whole cache     {t['cache'] * 1e3:8.1f} ms"
          f"\n  speed-up                 {t['cache'] / t['prompt']:8.2f}x")


def run_cuda(args, device: str = "cuda") -> None:
    bandwidth = copy_bandwidth(device)
    print(f"device copy bandwidth: {bandwidth / 1e9:.0f} GB/s")
    prompt_len, new_tokens = 128, 256
    print(f"\n| {'model':<12} | {'batch':>5} | {'sqlr1 tok/s':>11} | {'HF tok/s':>9} | {'ratio':>6} |"
          f" {'GB/s':>6} | {'% of copy':>9} |")
    print(f"|{'-' * 14}|{'-' * 7}|{'-' * 13}|{'-' * 11}|{'-' * 8}|{'-' * 8}|{'-' * 11}|")
    for name, config in (("Qwen2.5-0.5B", QWEN25_05B), ("Qwen2.5-7B", QWEN25_7B)):
        ours, hf = build_models(config, device, torch.bfloat16)
        # A decode step reads every weight matrix once; an untied embedding table only at the looked-up rows.
        weight_bytes = 2 * (num_params(ours) - (0 if config.tie_word_embeddings else ours.embed_tokens.weight.numel()))
        for batch in (1, 64):
            t = bench_decode(ours, hf, batch, prompt_len, new_tokens, 1.0, device, args.repeats, args.compile)
            tps, tps_hf = batch * new_tokens / t["ours"], batch * new_tokens / t["hf"]
            steps = new_tokens - 1  # forward passes after the prefill
            # key columns a decode step reads: the filled ones on average (eager), all of them under compile
            cache_len = prompt_len + new_tokens - 1 if args.compile else prompt_len + new_tokens // 2
            step_bytes = weight_bytes + kv_cache_bytes(config, batch, cache_len, torch.bfloat16)
            achieved = step_bytes * steps / (t["ours"] - t["prefill"])
            print(f"| {name:<12} | {batch:>5} | {tps:>11.0f} | {tps_hf:>9.0f} | {tps / tps_hf:>5.2f}x |"
                  f" {achieved / 1e9:>6.0f} | {100 * achieved / bandwidth:>8.0f}% |")
        del ours, hf
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
