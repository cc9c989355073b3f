"""Batched, KV-cached sampling with group prefix sharing: the GRPO rollout engine.

GRPO needs, for each prompt q, a group of G completions o_1..o_G ~ pi_old(. | q) and, for every sampled token,
log pi_old(o_t | q, o_<t). `generate` produces both:

1. Prefill each prompt once. The P prompts are left-padded to the longest length L and run through the model in one
   batch, writing keys/values into a static `KVCache` of T_max = L + max_new_tokens - 1 columns (the last sampled
   token is never fed back). Prefill cost depends on P, not on G.
2. Share the prefix. `kv_cache.select_rows` repeats each prompt's cache row G times (rows i*G .. i*G+G-1).
3. Decode all P*G rows together, one token per step, writing column L + s at step s. Left padding is invisible:
   the mask over cache columns hides pad keys and positions are "real tokens before this one" (RoPE positions of a
   padded prompt equal those of the prompt alone).
4. Every `check_every` steps (one host sync), stop if every row has emitted a stop id, else drop finished rows from
   the cache, mask and state (compiled: never below 2 rows, one finished row is kept along, so the batch never
   reaches the batch-1 graph). Rows that finish between checks keep decoding; what they emit after the stop id is
   discarded.

The sampling distribution at each step is p = softmax(z[:V] / tau), z the logits and V = `vocab_size` (ids >= V,
Qwen's padded embedding rows, are never computed, so never sampled), optionally truncated by top-k then top-p
(nucleus) and renormalised. The returned log-prob of a sampled token y is the UNtruncated

    log p(y) = z_y / tau - logsumexp(z[:V] / tau),

exactly what `Qwen2.token_logprobs(ids, temperature=tau, vocab_size=V)` computes on prompt + completion, which the
GRPO loss uses as log pi_old. Greedy decoding (tau = 0) reports the tau = 1 log-prob.

Randomness: inverse-CDF sampling, one uniform u per (row, step). Every step draws a block of N uniforms from a
`torch.Generator` seeded with `seed`, N = P*G the number of rows at the start; row r (prompt r // G, sample r % G)
always reads entry r of the block, whatever compaction has done. Guarantee: for a fixed seed, the samples are a
function of the prompt list, num_samples and the sampling settings only: they do not depend on `check_every`
(compaction), `share_prefix`, `compile`, or on the contents and lengths of the other prompts. Changing the number
of prompts (hence N) changes the stream. (Up to float rounding: kernels may round differently at different batch
sizes, which can move a draw only when u falls within ~1e-6 of a CDF step.)

Multi-turn rollouts (`on_pause`, used by sqlr1/sql_env.py; the sampler knows nothing of SQL): when a live row
samples an id in `pause_ids`, the step's paused rows (all of them, in one call) are handed to
`on_pause(rows, generated) -> tokens to append`, rows being original row ids and generated each row's completion so
far (the pause id last). The returned tokens o_1..o_k (an observation; [] for none) join the row's completion
without being sampled: they are marked in `Samples.model_mask` (False), carry log-prob 0, and count against
max_new_tokens (clipped to what is left; a row that reaches the budget ends with "length"). How the cache is used:
all rows share one write column c, as in single-turn decoding. The next forward then has width W = 1 + K, K the
longest observation of the step: row b feeds [y_b, o_1..o_kb, pad..] at columns c..c+W-1, and the columns past its
own 1 + k_b are masked out for good, so a row that did not pause runs a normal decode step (its K extra columns
hidden) and paused rows never wait: all rows keep decoding in the same batch. The next token of row b is sampled
from the output at its column c + k_b, positions continue from its real token count, the prefix is never
recomputed. The cache grows when K columns are needed past L + max_new_tokens - 1 (one reallocation by at least a
quarter of its width). The price of the shared column: the cache widens by sum over pause steps of the step's
longest observation, for every row, and compaction drops rows, not columns (a call whose rows pause at many
different steps holds up to L + max_new_tokens * (1 + obs_max_tokens) columns in the worst case): keep multi-turn
batches bounded (eval_batch_size). Per-row write columns would bound it by L + max_new_tokens. This path is eager and checks for pauses every step (one host sync per step); compaction of
finished rows works as above. Without `on_pause` nothing of this runs: the single-turn loop is unchanged.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sqlr1.model import KVCache, Qwen2


class NonFiniteLogitsError(ValueError):
    """The model's logits for a prompt hold NaN or inf: its weights are broken (e.g. a diverged checkpoint)."""


@dataclass
class Samples:
    """Completions in prompt-major order: completion i*num_samples + j is sample j of prompt i."""

    prompt_index: list[int]  # which prompt each completion belongs to
    tokens: list[list[int]]  # completion ids, the stop id included when hit, nothing after it
    logprobs: list[list[float]]  # log p(token) under softmax(logits[:vocab_size] / temperature), before truncation
    finish_reason: list[str]  # "stop" (emitted a stop id) or "length" (reached max_new_tokens)
    model_mask: list[list[bool]] | None = None  # per token: True if sampled, False if appended by on_pause


def truncate_logprobs(logp: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Keep the top_k most likely ids (0: all), then the smallest set of most likely ids whose renormalised mass
    reaches top_p (nucleus); the rest get -inf. logp [B, V] -> [B, V] (unnormalised once truncated)."""
    if 0 < top_k < logp.shape[-1]:
        kth = logp.topk(top_k, dim=-1).values[:, -1:]
        logp = logp.masked_fill(logp < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logp, order = logp.sort(dim=-1, descending=True)
        probs = sorted_logp.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # mass of the strictly more likely ids
        drop_sorted = mass_before >= top_p  # the most likely id always stays (mass_before = 0)
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logp = logp.masked_fill(drop, float("-inf"))
    return logp


def sample_tokens(
    logits: torch.Tensor, temperature: float | torch.Tensor, top_k: int, top_p: float, uniform: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one id per row and return (ids [B], log p(ids) [B]).

    logits [B, V] fp32; uniform [B] i.i.d. U(0, 1), or None for greedy decoding (temperature 0: argmax; temperature
    is then unused). Greedy is told by `uniform`, not by temperature's value, so that temperature may be a 0-d
    tensor (the compiled decode step: no graph per temperature). The draw is inverse-CDF sampling of the truncated
    distribution p~: y = min{v : F(v) > u F(V)}, F the cumulative sum of p~ (u F(V) is kept below F(V) so a float
    rounding can never pick an id with p~ = 0). The log-prob is the untruncated log softmax(logits / tau) at the
    drawn id (tau = 1 for greedy).
    """
    if uniform is None:
        logp = logits.log_softmax(-1)
        ids = logp.argmax(-1)
    else:
        logp = (logits / temperature).log_softmax(-1)
        cdf = truncate_logprobs(logp, top_k, top_p).exp().cumsum(-1)
        total = cdf[:, -1:]
        target = torch.minimum(uniform[:, None] * total, total.nextafter(torch.zeros_like(total)))
        ids = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return ids, logp.gather(-1, ids[:, None]).squeeze(-1)


def _decode_step(
    model: Qwen2, vocab_size: int, ids, attention_mask, position_ids, kv_cache, cache_position,
    temperature: float | torch.Tensor, top_k: int, top_p: float, uniform,
):
    """Feed one token per row and draw the next one: (ids [B], log p(ids) [B]). The logits [B, vocab_size] are
    computed in fp32 from head rows < vocab_size only. One function, so that `compile` fuses the sampling too."""
    h = model.hidden_states(ids[:, None], attention_mask, position_ids[:, None], kv_cache, cache_position)
    logits = F.linear(h[:, -1], model.lm_head.weight[:vocab_size]).float()
    return sample_tokens(logits, temperature, top_k, top_p, uniform)


@functools.cache
def _compiled_decode_step():
    """`_decode_step` under torch.compile, built on first use (importing the compiler takes seconds).

    The number of graphs over a whole run is bounded, whatever values the run uses: the batch B (it shrinks as rows
    finish) and the cache width T_max (it follows the prompt lengths) are symbolic from the first call (marked
    dynamic); B never reaches 1, which dynamo would specialise (`_generate` keeps a finished row along, and runs a
    one-row call eager); the temperature arrives as a 0-d tensor (no guard on its value); greedy decoding (uniform
    None) is a graph of its own; vocab_size and top_k stay Python ints (fixed in a run). So a run builds one greedy
    graph and one sampled graph per (top_k > 0, top_p < 1) combination it uses: 2 for SQL-R1's recipe, well below
    dynamo's recompile limit (8; past it the step would silently run eager)."""
    compiled = torch.compile(_decode_step)
    built = set()

    def step(model, vocab_size, ids, attention_mask, position_ids, kv_cache, cache_position, temperature, top_k,
             top_p, uniform):
        for t in (ids, attention_mask, position_ids, *kv_cache.k, *kv_cache.v, *([] if uniform is None else [uniform])):
            torch._dynamo.maybe_mark_dynamic(t, 0)  # B
        for t in (attention_mask, *kv_cache.k, *kv_cache.v):
            torch._dynamo.maybe_mark_dynamic(t, 1 if t is attention_mask else 2)  # T_max
        graph = "greedy" if uniform is None else f"sampled, top_k={top_k}, top_p={top_p:g}"
        t0 = time.time()
        out = compiled(model, vocab_size, ids, attention_mask, position_ids, kv_cache, cache_position, temperature,
                       top_k, top_p, uniform)
        if graph not in built:  # the first call of a graph compiles it: a one-time cost worth seeing
            built.add(graph)
            tqdm.write(f"torch.compile: decode step ({graph}) ready in {time.time() - t0:.1f} s, once per process",
                       file=sys.stderr)
        return out

    return step


def _check_args(model, prompts, num_samples, max_new_tokens, temperature, top_p, top_k, vocab_size, check_every):
    cfg = model.config
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples}: must be >= 1")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if not 0 <= temperature < math.inf:
        raise ValueError(f"temperature={temperature}: must be finite and >= 0 (0 means greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: must lie in (0, 1]")
    if top_k < 0:
        raise ValueError(f"top_k={top_k}: must be >= 0 (0 disables top-k)")
    if not 1 <= vocab_size <= cfg.vocab_size:
        raise ValueError(f"vocab_size={vocab_size}: must lie in [1, {cfg.vocab_size}] (the model's embedding rows)")
    if check_every < 1:
        raise ValueError(f"check_every={check_every}: must be >= 1")
    if len(prompts) == 0:
        raise ValueError("prompts: empty list; pass at least one prompt (a list of token ids)")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompts[{i}]: empty prompt; every prompt needs at least one token")
        if len(p) > cfg.max_position_embeddings:
            raise ValueError(
                f"prompts[{i}]: {len(p)} tokens exceeds the model's max_position_embeddings="
                f"{cfg.max_position_embeddings}; truncate the prompt"
            )
        if min(p) < 0 or max(p) >= cfg.vocab_size:
            raise ValueError(f"prompts[{i}]: token ids must lie in [0, {cfg.vocab_size}) for this model")


def generate(
    model: Qwen2,
    prompts: list[list[int]],
    num_samples: int = 1,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_ids: Sequence[int] = (),
    vocab_size: int | None = None,
    seed: int | None = None,
    compile: bool = False,
    progress: bool | None = None,
    check_every: int = 8,
    share_prefix: bool = True,
    pause_ids: Sequence[int] = (),
    on_pause: Callable[[list[int], list[list[int]]], list[list[int]]] | None = None,
) -> Samples:
    """Sample `num_samples` completions for each prompt (see the module docstring for the algorithm).

    temperature 0 is greedy; top_k 0 and top_p 1 disable truncation; `vocab_size` (default: the model's) is the
    tokenizer's real vocabulary — ids >= vocab_size are never produced. Generation of a row ends at the first id in
    `stop_ids` or after `max_new_tokens`. `seed` fixes the random stream (None: nondeterministic). `compile` runs the
    decode step under torch.compile (same results; the first calls of a process pay a compilation: one graph for
    greedy decoding, one for sampling, with the batch size and cache length symbolic; a one-row call runs eager).
    `share_prefix=False` prefills every row separately (same results; for tests and benchmarks). `progress` shows a
    tqdm bar over generated tokens (None: only when stderr is a terminal). `pause_ids` / `on_pause`: multi-turn
    rollouts (module docstring; `compile` is then ignored). The model runs in eval mode under inference_mode; its
    training flag is restored afterwards.
    """
    vocab_size = model.config.vocab_size if vocab_size is None else vocab_size
    _check_args(model, prompts, num_samples, max_new_tokens, temperature, top_p, top_k, vocab_size, check_every)
    progress = sys.stderr.isatty() if progress is None else progress
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return _generate(
                model, prompts, num_samples, max_new_tokens, temperature, top_p, top_k, stop_ids, vocab_size,
                seed, compile, progress, check_every, share_prefix, pause_ids, on_pause,
            )
    finally:
        model.train(was_training)


def _generate(
    model, prompts, num_samples, max_new_tokens, temperature, top_p, top_k, stop_ids, vocab_size,
    seed, compile, progress, check_every, share_prefix, pause_ids=(), on_pause=None,
) -> Samples:
    group, out_ids, out_logp, *model_mask = sample_tensors(
        model, prompts, num_samples, max_new_tokens, temperature, top_p, top_k, stop_ids, vocab_size,
        seed, compile, progress, check_every, share_prefix, pause_ids=pause_ids, on_pause=on_pause,
    )
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=out_ids.device)
    # Cut each row after its first stop id (tokens emitted after it, between checks, are discarded). A stop id
    # inside an appended observation is not one: only sampled tokens stop a row.
    is_stop = torch.isin(out_ids, stops)
    if model_mask:
        is_stop &= model_mask[0]
    stopped = is_stop.any(-1)
    lengths_out = torch.where(stopped, is_stop.int().argmax(-1) + 1, max_new_tokens).tolist()
    tokens, logprobs = out_ids.tolist(), out_logp.tolist()
    flags = model_mask[0].tolist() if model_mask else [[True] * n for n in lengths_out]
    return Samples(
        prompt_index=group.tolist(),
        tokens=[t[:n] for t, n in zip(tokens, lengths_out)],
        logprobs=[lp[:n] for lp, n in zip(logprobs, lengths_out)],
        finish_reason=["stop" if x else "length" for x in stopped.tolist()],
        model_mask=[f[:n] for f, n in zip(flags, lengths_out)],
    )


def sample_tensors(
    model, prompts, num_samples, max_new_tokens, temperature, top_p, top_k, stop_ids, vocab_size,
    seed, compile, progress, check_every, share_prefix, first_step: int = 0, check_finite: bool = True,
    pause_ids: Sequence[int] = (), on_pause=None,
) -> tuple[torch.Tensor, ...]:
    """The tensor loop of `_generate` (prefill, prefix sharing, decode): (row's prompt [N], ids [N, max_new_tokens]
    (-1 where a row stopped early), log-probs [N, max_new_tokens]), and with `on_pause` a fourth, the model-token
    mask [N, max_new_tokens] (`_decode_with_pauses`). No host sync but the prefill's finite check
    (check_finite) and the stop checks (none without stop ids). `first_step` > 0 starts decoding at step `first_step` (the cache is as long as for step 0):
    the dry run (sqlr1/dryrun.py) prices only the last, widest decode step, and passes check_finite=False (the
    prefill logits' NaN check is a host sync that fake tensors cannot answer)."""
    weight = model.lm_head.weight
    device, dtype = weight.device, weight.dtype
    P, G = len(prompts), num_samples
    N = P * G  # rows at the start; row r = sample r % G of prompt r // G
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    L = max(len(p) for p in prompts)
    T_max = L + max_new_tokens - 1

    # Left padding: prompt i occupies columns L - len_i .. L-1. Mask columns from L on are set once, up front: the
    # causal mask hides future columns, so the mask never needs an update while decoding.
    ids = torch.zeros(P, L, dtype=torch.long, device=device)
    mask = torch.ones(P, T_max, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, L - len(p) :] = torch.tensor(p, device=device)
        mask[i, : L - len(p)] = False
    group = torch.arange(P, device=device).repeat_interleave(G)  # prompt of each row
    if not share_prefix:
        ids, mask = ids[group], mask[group]

    kv_cache = KVCache(model.config, ids.shape[0], T_max, device=device, dtype=dtype)
    # prefill attends over the L prompt columns only (the mask's first L columns), not the whole cache
    h = model.hidden_states(ids, mask[:, :L], kv_cache=kv_cache, cache_position=torch.arange(L, device=device))
    logits = F.linear(h[:, -1], weight[:vocab_size]).float()
    del h
    # one host sync per call: sampling from NaN logits gives garbage or index errors
    if check_finite and not bool(torch.isfinite(logits).all()):
        bad = (~torch.isfinite(logits).all(-1)).nonzero().flatten().tolist()
        raise NonFiniteLogitsError(f"the model's logits are NaN or infinite (batch rows {bad[:5]}): its weights are "
                                   "broken (NaN or inf in the checkpoint?) or overflow its dtype")
    if share_prefix and G > 1:
        kv_cache.select_rows(group)
        mask, logits = mask[group], logits[group]

    positions = lengths[group]  # RoPE position of the next token of each row
    rows = torch.arange(N, device=device)  # original row id of each live row
    done = torch.zeros(N, dtype=torch.bool, device=device)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    out_ids = torch.full((N, max_new_tokens), -1, dtype=torch.long, device=device)
    out_logp = torch.zeros(N, max_new_tokens, device=device)
    columns = torch.arange(L, T_max, device=device)
    generator = torch.Generator(device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    compile = compile and N >= 2  # a batch of 1 would be a graph of its own: one row decodes eager
    step_fn = _compiled_decode_step() if compile else _decode_step
    step_temperature = torch.tensor(float(temperature), device=device) if compile else temperature
    min_rows = 2 if compile else 1  # compiled: compaction keeps a finished row along rather than reach batch 1

    def uniforms():  # one uniform per original row and step, drawn whether or not the row is live: row r reads entry r
        return torch.rand(N, generator=generator, device=device)[rows] if temperature > 0 else None

    next_ids, next_logp = sample_tokens(logits, temperature, top_k, top_p, uniforms())
    bar = tqdm(total=N * max_new_tokens, unit="tok", desc="sampling", disable=not progress)
    if on_pause is not None:
        pauses = torch.tensor(list(pause_ids), dtype=torch.long, device=device)
        return (group, *_decode_with_pauses(model, vocab_size, kv_cache, mask, positions, next_ids, next_logp, L,
                                            max_new_tokens, stops, pauses, on_pause, temperature, top_k, top_p,
                                            generator, rows, check_every, bar))
    for s in range(first_step, max_new_tokens):
        out_ids[rows, s] = next_ids
        out_logp[rows, s] = next_logp
        bar.update(rows.shape[0])
        if s == max_new_tokens - 1:
            break
        if len(stops):
            done |= torch.isin(next_ids, stops)
            if (s + 1) % check_every == 0:
                num_live = int((~done).sum())  # the one host sync per check
                if num_live == 0:
                    break
                if max(num_live, min_rows) < rows.shape[0]:
                    keep = (~done).nonzero().squeeze(-1)
                    if num_live < min_rows:  # its tokens after its stop id are discarded like any row's
                        keep = torch.cat([keep, done.nonzero()[: min_rows - num_live, 0]]).sort().values
                    kv_cache.select_rows(keep)
                    mask, positions, rows, done, next_ids = (
                        t.index_select(0, keep) for t in (mask, positions, rows, done, next_ids)
                    )
        # Keys beyond column L + s are still empty. Eager: pass only the filled part of the mask (attention reads that
        # much). Compiled: pass all T_max columns, the cache's width, so the step sees one width per call (the mask
        # hides empty columns).
        width = T_max if compile else L + s + 1
        next_ids, next_logp = step_fn(
            model, vocab_size, next_ids, mask[:, :width], positions, kv_cache,
            columns[s : s + 1], step_temperature, top_k, top_p, uniforms(),
        )
        positions += 1
    bar.close()
    del kv_cache
    return group, out_ids, out_logp


def _decode_with_pauses(model, vocab_size, kv_cache, mask, positions, next_ids, next_logp, L, max_new_tokens, stops,
                        pauses, on_pause, temperature, top_k, top_p, generator, rows, check_every, bar):
    """The multi-turn decode loop (module docstring): -> (ids, log-probs, model-token mask), each [N, max_new_tokens].

    Each row writes its own completion position n_b (sampled and appended tokens alike); a finished row keeps
    decoding until the next compaction, its writes going to a scratch column M (dropped at the end)."""
    device = next_ids.device
    M = max_new_tokens
    N = rows.shape[0]  # rows: original row id of each live row
    out_ids = torch.full((N, M + 1), -1, dtype=torch.long, device=device)
    out_logp = torch.zeros(N, M + 1, device=device)
    out_model = torch.zeros(N, M + 1, dtype=torch.bool, device=device)
    n_out = torch.zeros(N, dtype=torch.long, device=device)  # completion tokens of each live row
    done = torch.zeros(N, dtype=torch.bool, device=device)
    col, step = L, 0  # next free cache column (shared by all rows), loop iteration
    while True:
        at = torch.where(done, M, n_out)
        out_ids[rows, at], out_logp[rows, at], out_model[rows, at] = next_ids, next_logp, True
        n_out += ~done
        done |= torch.isin(next_ids, stops) | (n_out >= M)
        bar.update(rows.shape[0])
        paused = (torch.isin(next_ids, pauses) & ~done).nonzero().squeeze(-1).tolist()  # host sync, every step
        appended = [[] for _ in range(rows.shape[0])]
        if paused:
            ids_of, lengths = rows[paused].tolist(), n_out[paused].tolist()
            got = on_pause(ids_of, [out_ids[r, :n].tolist() for r, n in zip(ids_of, lengths)])
            if len(got) != len(paused):
                raise ValueError(f"on_pause returned {len(got)} token lists for {len(paused)} paused rows")
            for b, r, n, toks in zip(paused, ids_of, lengths, got):
                toks = list(toks)[: M - n]  # the observation counts against the row's budget
                if toks:
                    appended[b] = toks
                    out_ids[r, n : n + len(toks)] = torch.tensor(toks, device=device)
            k = torch.tensor([len(a) for a in appended], device=device)
            n_out += k
            done |= n_out >= M
        else:
            k = torch.zeros(rows.shape[0], dtype=torch.long, device=device)
        if bool(done.all()):
            break
        step += 1
        if step % check_every == 0 and bool(done.any()):
            keep = (~done).nonzero().squeeze(-1)
            kv_cache.select_rows(keep)
            mask, positions, rows, done, next_ids, n_out, k = (
                t.index_select(0, keep) for t in (mask, positions, rows, done, next_ids, n_out, k))
            appended = [appended[i] for i in keep.tolist()]
        W = 1 + max(len(a) for a in appended)
        if col + W > mask.shape[1]:  # grow the static cache (observations wider than the single-turn bound)
            extra = max(col + W - mask.shape[1], mask.shape[1] // 4)
            kv_cache.grow(extra)
            mask = F.pad(mask, (0, extra), value=True)
        span = torch.arange(W, device=device)
        ids = torch.zeros(rows.shape[0], W, dtype=torch.long, device=device)
        ids[:, 0] = next_ids
        for b, a in enumerate(appended):
            if a:
                ids[b, 1 : 1 + len(a)] = torch.tensor(a, device=device)
        mask[:, col : col + W] = span[None] <= k[:, None]  # a row's columns past its own tokens stay hidden
        h = model.hidden_states(ids, mask[:, : col + W], positions[:, None] + span, kv_cache,
                                torch.arange(col, col + W, device=device))
        h = h.gather(1, k[:, None, None].expand(-1, 1, h.shape[-1]))[:, 0]  # output at each row's last fed token
        logits = F.linear(h, model.lm_head.weight[:vocab_size]).float()
        u = torch.rand(N, generator=generator, device=device)[rows] if temperature > 0 else None  # entry r: row r
        next_ids, next_logp = sample_tokens(logits, temperature, top_k, top_p, u)
        positions += 1 + k
        col += W
    bar.close()
    return out_ids[:, :M], out_logp[:, :M], out_model[:, :M]
