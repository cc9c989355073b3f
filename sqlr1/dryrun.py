"""The dry run: a training step's phases at full scale under fake tensors and a fake process group; memory per phase.

    python train.py --config configs/grpo_7b.py --dry_run --gpus=8 --gpu_mem_gb=80 [--dry_run_out=FILE.md]

It runs train.py's own phases: `distributed.build_models` (each model loaded, then FSDP-sharded), the sampler's
tensor loop under `distributed.rollout_weights` for evaluation and rollouts, `update.policy_update` (reference,
old logp, update, optimizer: the phases it announces) and the export's `gather_full_params`, on tensors with shapes
and no data (`FakeTensorMode`) over `gpus` ranks that move nothing; torch's MemTracker follows rank 0 and reports,
per phase, the peak of parameters + gradients + AdamW state + activations + KV cache + temporaries. Worst case:
every prompt max_prompt_len tokens, every row decoding to max_response_len (the widest step, then the compaction
that drops one finished row), two micro-batches in the update, `.item()` answering 1 (`PlaceholderScalars`).
Assumed rather than simulated, per call shape by probing `model.attention`: CUDA's kernel choice (a masked GQA call
repeats K/V to H heads and runs the memory-efficient kernel: an upper bound where that kernel takes GQA natively;
no [B, H, T, S] scores), and AdamW's foreach temporary; not modelled: the CUDA context, fragmentation (the 10 %
headroom) and NCCL buffers.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from sqlr1 import distributed, update
from sqlr1.batch import TrainSequence, split_micro_batches
from sqlr1.config import DTYPES, TrainConfig
from sqlr1.model import KVCache, ModelConfig, Qwen2, attention
from sqlr1.sampling import SamplingParams, sample_tensors

GiB = 2**30
HEADROOM = 0.10
COLUMNS = ("parameters", "gradients", "optimizer", "activations", "kv_cache", "temporaries", "total")
PHASES = ("build", "eval greedy", "eval voted", "rollout", "reference", "old logp", "update", "optimizer",
          "checkpoint")

_QWEN25_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, head_dim=128, max_position_embeddings=32768,
                  rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False)
_QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                   num_attention_heads=14, num_key_value_heads=2, head_dim=64, max_position_embeddings=32768,
                   rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
# Hub ids the dry run knows without a download: (config.json fields, the tokenizer's real vocabulary)
KNOWN_MODELS = {
    "Qwen/Qwen2.5-Coder-7B-Instruct": (_QWEN25_7B, 151665),
    "Qwen/Qwen2.5-Coder-7B": (_QWEN25_7B, 151665),
    "Qwen/Qwen2.5-7B-Instruct": (_QWEN25_7B, 151665),
    "Qwen/Qwen2.5-0.5B": (_QWEN25_05B, 151665),
    "Qwen/Qwen2.5-0.5B-Instruct": (_QWEN25_05B, 151665),
}


def model_shape(model: str) -> tuple[ModelConfig, int]:
    """(ModelConfig, tokenizer vocabulary) of a local checkpoint directory, or of a known hub id (no download)."""
    d = Path(model).expanduser()
    if (d / "config.json").is_file():
        from sqlr1.checkpoint import config_from_hf, read_json
        from sqlr1.tokenizer import load_tokenizer

        config = config_from_hf(read_json(d / "config.json"), source=str(d / "config.json"))
        vocab = load_tokenizer(d).vocab_size if (d / "tokenizer.json").is_file() else config.vocab_size
        return config, vocab
    if model in KNOWN_MODELS:
        fields, vocab = KNOWN_MODELS[model]
        return ModelConfig(**fields), vocab
    raise ValueError(f"dry run: model {model!r} is neither a local checkpoint directory (with config.json) nor a "
                     f"known hub id ({', '.join(KNOWN_MODELS)}); pass --model=<local dir>")


class PlaceholderScalars(TorchDispatchMode):
    """Host reads of a fake tensor's value (.item(), float(t), bool(t), .tolist()) answer 1 (True): a dry run has no
    values, and every value it reads only feeds a check or a log line (finite logits, grad norm, token counts)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.is_nonzero.default:
            return True
        if func is torch.ops.aten._local_scalar_dense.default:
            t = args[0]
            return True if t.dtype == torch.bool else 1.0 if t.dtype.is_floating_point else 1
        return func(*args, **(kwargs or {}))


def _tracker():
    """torch's MemTracker reduced to what the dry run reads, the per-device peak: a module called again at top level
    (the decode step after prefill, the next micro-batch after a backward; token_logprobs / hidden_states are not
    module calls that would give the loop one root) starts fresh per-module statistics instead of raising, and the
    per-module peaks are not kept (updating them on every op of a 7B step is most of the simulation's time)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class Tracker(MemTracker):
        def _pre_fw_hook(self, module, inputs) -> None:
            name = self._mod_tracker.get_known_fqn(module)
            if not self._mod_tracker.is_bw and set(self._mod_tracker.parents) <= {"Global", name}:
                self.memory_tracking.pop(module, None)
            super()._pre_fw_hook(module, inputs)

        def _update_peak_stats(self, peak_state) -> None:
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev] = snap["Total"]
                    self._peak_mem_snap[dev] = dict(snap)

    return Tracker()


@dataclass
class Plan:
    """What one simulation runs (per rank)."""

    micro_batch_size: int
    eval_batch: int  # prompts per generate call in evaluation (0: no evaluation)
    max_micro: int = 2  # micro-batches simulated: the second shows what accumulating gradients across them holds


def rank_counts(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(rollout sequences, held-out prompts) of one rank."""
    prompts = cfg.prompts_per_step // world
    evals = math.ceil(cfg.eval_limit / world) if cfg.eval_split and cfg.eval_limit else 0
    return prompts * cfg.group_size, evals


def eval_batch_of(cfg: TrainConfig, world: int) -> int:
    """Prompts per evaluation generate call: TrainConfig.eval_batch_size (0: all of a rank's prompts)."""
    evals = rank_counts(cfg, world)[1]
    return min(cfg.eval_batch_size, evals) if cfg.eval_batch_size else evals


def _row(snap: dict, kv: int = 0, act_extra: int = 0, temp_extra: int = 0, weights: bool = False,
         no_activations: bool = False) -> dict[str, int]:
    """A phase's table row from a MemTracker peak snapshot (one device). The tracker counts the KV cache as an
    activation: `kv` (from the cache's shape) moves there. `weights`: everything allocated is parameters (build).
    `no_activations` (optimizer step): what the tracker lists as activations there is, under fake tensors, DTensor's
    sharding propagation of clip_grad_norm_'s foreach ops (fake copies of the gradient list), no device memory;
    the real run has none."""
    by = {str(k.value) if hasattr(k, "value") else k: v for k, v in snap.items()}
    row = {"parameters": by["Parameter"] + by["Buffer"], "gradients": by["Gradient"], "optimizer": by["Optstate"],
           "activations": by["Activation"] + by["Other"], "kv_cache": 0, "temporaries": by["Temp"]}
    if weights:
        row["parameters"] += row["activations"]
        row["activations"] = 0
    if no_activations:
        row["activations"] = 0
    kv = min(kv, row["activations"])
    row["activations"] += act_extra - kv
    row["kv_cache"] = kv
    row["temporaries"] += temp_extra
    row["total"] = sum(row[c] for c in COLUMNS[:-1])
    return row


def _cuda_attention_gap(mc: ModelConfig, B: int, T: int, S: int, dtype: torch.dtype) -> int:
    """Bytes CUDA allocates for one masked `attention` call [B, H, T, D] x [B, H_kv, S, D] under the documented rule
    (K/V repeated to H heads for GQA + memory-efficient kernel: output + fp32 logsumexp) beyond what the call
    allocates here (probed on fake tensors with the tracker)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    H, Hkv, D, s = mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim, dtype.itemsize
    rule = B * H * T * D * s + B * H * T * 4 + (2 * B * H * S * D * s if H != Hkv else 0)
    with FakeTensorMode(), torch.no_grad():
        q, k, v = (torch.empty(B, h, n, D, dtype=dtype) for h, n in ((H, T), (Hkv, S), (Hkv, S)))
        mask = torch.zeros(B, 1, T, S, dtype=dtype)
        mt = MemTracker()
        with mt:
            attention(q, k, v, mask)
        here = next(iter(mt.get_tracker_snapshot("peak").values()), {}).get("Total", 0)
    return max(0, rule - here)


def _kv_bytes(mc: ModelConfig, rows: int, T_max: int, dtype: torch.dtype) -> int:
    return 2 * mc.num_hidden_layers * rows * mc.num_key_value_heads * T_max * mc.head_dim * dtype.itemsize


def simulate(cfg: TrainConfig, mc: ModelConfig, vocab: int, world: int, plan: Plan, mesh, fake: bool = True,
             phases: tuple[str, ...] = PHASES, log=None) -> dict[str, dict[str, int]]:
    """Run the phases as rank `dist.get_rank()` of an initialised process group (fake, or real gloo in the test),
    sharding over `mesh`; {phase: row}, bytes per column. With fake=False the same code runs on real tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    dtype, device, C = DTYPES[cfg.dtype], torch.device("cpu"), cfg.max_response_len
    d = distributed.Dist(rank=dist.get_rank(), world_size=world, device=device)
    n_prompts = rank_counts(cfg, world)[0] // cfg.group_size
    B = min(plan.micro_batch_size, n_prompts * cfg.group_size)
    gap = {"eval": _cuda_attention_gap(mc, plan.eval_batch, cfg.max_prompt_len, cfg.max_prompt_len, dtype)
           if plan.eval_batch else 0,
           "rollout": _cuda_attention_gap(mc, n_prompts, cfg.max_prompt_len, cfg.max_prompt_len, dtype),
           # shared prefix: the prompt once per group (unpadded: a fused causal kernel, nothing to add) and the
           # completions [B, C] over prompt + their own keys (masked); else every row over L + C keys
           "train": _cuda_attention_gap(mc, B, C, cfg.max_prompt_len + C, dtype) if cfg.shared_prefix
           else _cuda_attention_gap(mc, B, cfg.max_prompt_len + C, cfg.max_prompt_len + C, dtype)}  # before fake mode
    extra = {"reference": {"act_extra": gap["train"]}, "old logp": {"act_extra": gap["train"]},
             "update": {"act_extra": gap["train"], "temp_extra": gap["train"]}}
    rng, rows, alive = random.Random(0), {}, {}

    def tokens(n: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(n)]

    @contextlib.contextmanager
    def phase(name: str, **row_args):
        """A fresh tracker starting from what is alive (the models, AdamW's state); the phase's row is its peak
        (the largest when a phase repeats: ppo_epochs > 1)."""
        t0 = time.time()
        tracker = _tracker()
        tracker.track_external(*alive.values())
        with tracker:
            yield
        snap = next(iter(tracker.get_tracker_snapshot("peak").values()))
        row = _row(snap, **{**extra.get(name, {}), **row_args})
        if name not in rows or row["total"] > rows[name]["total"]:
            rows[name] = row
        if log is not None:
            log(f"{name}: {time.time() - t0:.0f} s")

    def load(dt: torch.dtype) -> Qwen2:  # a model of the checkpoint's shape, allocated directly in dt
        default = torch.get_default_dtype()
        torch.set_default_dtype(dt)
        try:
            with torch.device(device):
                model = Qwen2(mc)
        finally:
            torch.set_default_dtype(default)
        model.init_weights(std=0.02)
        return model

    def generate(name: str, prompts: int, G: int, temperature: float) -> None:
        """A rollout or evaluation call at its widest decode step, then a compaction dropping one finished row."""
        params = SamplingParams(C, temperature, 1.0 if name.startswith("eval") else cfg.top_p,
                                0 if name.startswith("eval") else cfg.top_k, (), vocab, seed=0)
        with phase(name, kv=int(_kv_bytes(mc, prompts * G, cfg.max_prompt_len + C - 1, dtype)
                                * (1 + 1 / (2 * mc.num_hidden_layers))), act_extra=gap[name.split()[0]]):
            with distributed.rollout_weights(models) as model, torch.inference_mode():
                model.eval()
                sample_tensors(model, [tokens(cfg.max_prompt_len) for _ in range(prompts)], G, params,
                               first_step=C - 2)
                if prompts * G > 1:
                    cache = KVCache(mc, prompts * G, cfg.max_prompt_len + C - 1, device=device, dtype=dtype)
                    cache.select_rows(torch.arange(prompts * G - 1, device=device))
                    del cache

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    with fake_mode, PlaceholderScalars() if fake else contextlib.nullcontext():
        with phase("build", weights=True):
            models = distributed.build_models(cfg, d, load, mesh)
        if models.ref is not None:  # MemTracker hooks every parameter's gradient; under no_grad: the same memory
            models.ref.requires_grad_(True)
        alive.update({k: m for k, m in (("policy", models.policy), ("ref", models.ref), ("rollout", models.rollout))
                      if m is not None})
        optimizer = update.new_optimizer(models.policy, cfg, "grpo")
        for p in models.policy.parameters():  # the steady state: AdamW's m and v exist from the step before
            p.grad = torch.zeros_like(p)
        optimizer.adamw.step()
        optimizer.adamw.zero_grad(set_to_none=True)
        alive["optimizer"] = optimizer.adamw
        if plan.eval_batch and "eval greedy" in phases:
            generate("eval greedy", plan.eval_batch, 1, 0.0)
        if plan.eval_batch and cfg.eval_n > 1 and "eval voted" in phases:
            generate("eval voted", plan.eval_batch, cfg.eval_n, cfg.eval_temperature)
        if "rollout" in phases:
            generate("rollout", n_prompts, cfg.group_size, cfg.temperature)
        if {"reference", "old logp", "update", "optimizer"} & set(phases):
            seqs = []
            for g in range(n_prompts):
                prompt = tokens(cfg.max_prompt_len)  # a group shares its prompt (what the shared-prefix forward uses)
                seqs += [TrainSequence(prompt, tokens(C), advantage=1.0, sampler_logp=[-1.0] * C, group=g)
                         for _ in range(cfg.group_size)]
            chunks = split_micro_batches(seqs, plan.micro_batch_size, shared=cfg.shared_prefix)[: plan.max_micro]
            batch_cfg = replace(cfg, micro_batch_size=plan.micro_batch_size)
            shard_numel = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                              for p in models.policy.parameters())
            extra["optimizer"] = {"temp_extra": 4 * shard_numel, "no_activations": True}  # + AdamW foreach's temporary
            update.policy_update(models, optimizer, [s for chunk in chunks for s in chunk],
                                 _Vocab(vocab), batch_cfg, d, phases=phase)
        if "checkpoint" in phases:
            with phase("checkpoint"):
                for _, t in distributed.gather_full_params(models.policy, dtype):
                    del t  # rank 0 keeps it on the host (written shard by shard), not on the device
    return {name: rows[name] for name in PHASES if name in rows and name in phases}


@dataclass
class _Vocab:
    """What the update reads of a tokenizer."""

    vocab_size: int
    pad_id: int = 0


def fits(rows: dict[str, dict[str, int]], gpu_mem_gb: float) -> bool:
    return max(r["total"] for r in rows.values()) <= (1 - HEADROOM) * gpu_mem_gb * GiB


@dataclass
class Report:
    rows: dict[str, dict[str, int]]
    plan: Plan
    best_micro: int  # the largest micro_batch_size that fits (0: none)
    best_eval: int  # the largest eval batch that fits (0: none / no evaluation)
    gpus: int
    gpu_mem_gb: float
    seconds: float

    problem: str = ""  # why no batch size fits ("" when the search found sizes that do)

    @property
    def fits(self) -> bool:
        return fits(self.rows, self.gpu_mem_gb)

    def markdown(self, title: str) -> str:
        limit = (1 - HEADROOM) * self.gpu_mem_gb
        peak_phase = max(self.rows, key=lambda p: self.rows[p]["total"])
        lines = [f"{title}", "", "| phase | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
        for name, r in self.rows.items():
            lines.append(f"| {name} | " + " | ".join(f"{r[c] / GiB:.1f}" for c in COLUMNS) + " |")
        peak = self.rows[peak_phase]["total"] / GiB
        verdict = "fits" if peak <= limit else "does NOT fit"
        lines += ["", f"GiB per rank, {self.gpus} ranks. Peak: {peak_phase} {peak:.1f} GiB; {verdict} in "
                  f"{self.gpu_mem_gb:g} GiB with {HEADROOM:.0%} headroom (limit {limit:.1f} GiB). Simulated with "
                  f"micro_batch_size={self.plan.micro_batch_size}, eval batch={self.plan.eval_batch}.",
                  f"Largest that fit: micro_batch_size={self.best_micro}, eval_batch_size={self.best_eval} "
                  f"(voted pass: x eval_n rows). Simulated in {self.seconds:.0f} s.",
                  *([self.problem.replace("dry run: ", "Problem: ", 1)] if self.problem else []),
                  "Fake tensors + fake process group, real code (see sqlr1/dryrun.py); assumed, not simulated: CUDA "
                  "SDPA kernel choice (masked GQA: K/V repeated + memory-efficient kernel), AdamW foreach "
                  "temporary, no CUDA context / fragmentation. Every prompt max_prompt_len, every row decodes to "
                  "max_response_len; the update runs 2 micro-batches (what accumulating gradients across them holds)."]
        return "\n".join(lines) + "\n"


def _largest(candidates: list[int], ok, start: int) -> int:
    """The largest candidate c with ok(c), ok monotone (fits at c => fits below); 0 if none. Bisects the side of
    `start` (the configured value, already simulated) that can hold the answer: one or two simulations, not all."""
    if ok(start):
        best, lo, hi = start, candidates.index(start) + 1, len(candidates) - 1
    else:
        best, lo, hi = 0, 0, candidates.index(start) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        if ok(candidates[mid]):
            best, lo = candidates[mid], mid + 1
        else:
            hi = mid - 1
    return best


def _sizes(n: int, also: int) -> list[int]:
    """1, 2, 4, ... below n, n, and `also` (the configured value), sorted."""
    return sorted({1 << i for i in range(n.bit_length()) if 1 << i < n} | {n, also})


def check_request(cfg: TrainConfig, gpus: int, gpu_mem_gb: float) -> None:
    """The dry run's own arguments, checked before anything is built: one ValueError each."""
    if not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"--gpus={gpus}: the number of GPUs (ranks) must be an integer >= 1")
    if not (isinstance(gpu_mem_gb, (int, float)) and 0 < gpu_mem_gb < math.inf):
        raise ValueError(f"--gpu_mem_gb={gpu_mem_gb}: must be a positive number of GiB per GPU, e.g. 80")
    if cfg.prompts_per_step % gpus:
        raise ValueError(f"--gpus={gpus}: prompts_per_step={cfg.prompts_per_step} is not divisible by it; pick a "
                         f"divisor of {cfg.prompts_per_step} or set --prompts_per_step")
    if cfg.eval_split and cfg.eval_limit == 0 and cfg.eval_batch_size == 0:
        raise ValueError("dry run: eval_limit=0 and eval_batch_size=0: the evaluation's size is unknown without the "
                         "data; set --eval_limit or --eval_batch_size")


def dry_run(cfg: TrainConfig, gpus: int, gpu_mem_gb: float, log=None) -> Report:
    """Simulate cfg on `gpus` ranks of `gpu_mem_gb` each: the table, and the largest micro-batch and eval batch.
    `log(str)` hears each simulated phase and its time."""
    check_request(cfg, gpus, gpu_mem_gb)
    mc, vocab = model_shape(cfg.model)
    t0 = time.time()
    with fake_world(gpus) as mesh:
        n_seqs, n_eval = rank_counts(cfg, gpus)
        plan = Plan(micro_batch_size=min(cfg.micro_batch_size, n_seqs), eval_batch=eval_batch_of(cfg, gpus))
        limit = (1 - HEADROOM) * gpu_mem_gb * GiB
        rows = simulate(cfg, mc, vocab, gpus, plan, mesh, log=log)
        train_phases = ("reference", "old logp", "update")

        def micro_ok(mb: int) -> bool:
            if mb == plan.micro_batch_size:
                r = rows
            else:
                r = simulate(cfg, mc, vocab, gpus, replace(plan, micro_batch_size=mb, eval_batch=0), mesh,
                             phases=train_phases, log=log)
            return all(r[p]["total"] <= limit for p in train_phases if p in r)

        def eval_ok(eb: int) -> bool:
            if eb == plan.eval_batch:
                r = rows
            else:
                r = simulate(cfg, mc, vocab, gpus, replace(plan, eval_batch=eb), mesh,
                             phases=("eval greedy", "eval voted"), log=log)
            return all(r[p]["total"] <= limit for p in ("eval greedy", "eval voted") if p in r)

        other = [p for p in rows if p not in train_phases + ("eval greedy", "eval voted")]
        over = [p for p in other if rows[p]["total"] > limit]
        best_micro = best_eval = 0
        problem = ""
        if over:
            worst = max(over, key=lambda p: rows[p]["total"])
            problem = (f"dry run: phase {worst!r} needs {rows[worst]['total'] / GiB:.1f} GiB per GPU, over "
                       f"{limit / GiB:.1f} GiB ({gpu_mem_gb:g} GiB less {HEADROOM:.0%}) whatever the batch sizes; "
                       f"use more GPUs (--gpus) or a smaller model / max_prompt_len + max_response_len")
        else:
            best_micro = _largest(_sizes(n_seqs, plan.micro_batch_size), micro_ok, plan.micro_batch_size)
            if best_micro == 0:
                no_sync = (" (grad_accum_no_sync=true holds an unsharded fp32 gradient through the micro-batch "
                           "loop: try --grad_accum_no_sync=false)" if cfg.grad_accum_no_sync else "")
                problem = (f"dry run: the policy update does not fit in {limit / GiB:.1f} GiB per GPU even at "
                           f"micro_batch_size=1{no_sync}; use more GPUs (--gpus), or shorten max_prompt_len / "
                           f"max_response_len")
            best_eval = _largest(_sizes(n_eval, plan.eval_batch), eval_ok, plan.eval_batch) if n_eval else 0
            if n_eval and best_eval == 0 and not problem:
                problem = (f"dry run: evaluation does not fit in {limit / GiB:.1f} GiB per GPU even with one prompt "
                           f"per generate call; lower eval_n or max_prompt_len / max_response_len, or more GPUs")
        return Report(rows, plan, best_micro, best_eval, gpus, gpu_mem_gb, time.time() - t0, problem)


@contextlib.contextmanager
def fake_world(gpus: int):
    """A fake process group of `gpus` ranks (this process is rank 0; collectives move nothing) and its DeviceMesh,
    made outside any fake tensor mode."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=gpus)
    try:
        yield init_device_mesh("cpu", (gpus,))
    finally:
        dist.destroy_process_group()
