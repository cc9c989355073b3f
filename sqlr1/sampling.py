"""Batched, KV-cached sampling with group prefix sharing: the GRPO rollout engine.

For each prompt q it draws G completions o_1..o_G and reports log pi(o_t | q, o_<t) of every sampled token:
1. prefill each prompt once (left-padded to the longest, L) into a static KVCache of L + max_new_tokens - 1 columns;
2. repeat each prompt's cache row G times (prefix sharing: the prefill costs P prompts, not P * G rows);
3. decode every row together, one token per step; every `check_every` steps (one host sync) drop finished rows.
A token is drawn from p = softmax(z[:V] / tau), ids >= V (Qwen's padded rows) never computed, truncated by top-k
then top-p, by inverse-CDF sampling with one uniform per (row, step): row r reads entry r of each step's block, so
the samples depend on the prompts, G, the settings and the seed only, not on compaction, prefix sharing or
compile (up to float rounding at different batch sizes). The reported log-prob is the untruncated
log p(y) = z_y / tau - logsumexp(z[:V] / tau), what `Qwen2.token_logprobs` computes (greedy reports tau = 1).

Pause hook (multi-turn rollouts, sqlr1/sql_env.py; the sampler knows nothing of SQL): when a row samples one of
`pause.ids`, the step's paused rows go to `pause(rows, generated)`, which returns tokens to append (an observation).
They join the completion unsampled (`Samples.model_mask` False, log-prob 0), count against max_new_tokens, and
enter the cache with the next forward: rows share one write column, so a step whose longest observation has K
tokens feeds 1 + K columns to every row (each row's columns past its own tokens masked for good).
"""

from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sqlr1.model import KVCache, Qwen2


class NonFiniteLogitsError(ValueError):
    """The model's logits for a prompt hold NaN or inf: its weights are broken (e.g. a diverged checkpoint)."""


@dataclass
class SamplingParams:
    """How to sample. temperature 0 is greedy; top_k 0 and top_p 1 disable truncation; vocab_size is the
    tokenizer's real vocabulary (None: the model's rows); seed None is nondeterministic; compile runs the decode step
    under torch.compile (the same tokens; the first call of each graph compiles it, once per process)."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_ids: Sequence[int] = ()
    vocab_size: int | None = None
    seed: int | None = None
    compile: bool = False
    check_every: int = 8

    def __post_init__(self) -> None:
        self.stop_ids = tuple(self.stop_ids)
        for name, ok, rule in (("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
                               ("temperature", 0 <= self.temperature < math.inf, "finite and >= 0 (0: greedy)"),
                               ("top_p", 0 < self.top_p <= 1, "in (0, 1]"), ("top_k", self.top_k >= 0, ">= 0"),
                               ("check_every", self.check_every >= 1, ">= 1")):
            if not ok:  # NaN fails the comparisons too
                raise ValueError(f"{name}={getattr(self, name)}: must be {rule}")


class PauseHook(Protocol):
    """What the sampler calls back in multi-turn rollouts (sqlr1/sql_env.py)."""

    ids: Sequence[int]  # sampled ids at which a row pauses

    def __call__(self, rows: list[int], generated: list[list[int]]) -> list[list[int]]:
        """Tokens to append to each paused row (rows: original row ids; generated: each one's completion so far)."""


@dataclass
class Samples:
    """Completions in prompt-major order: completion i*num_samples + j is sample j of prompt i."""

    prompt_index: list[int]  # which prompt each completion belongs to
    tokens: list[list[int]]  # completion ids, the stop id included when hit, nothing after it
    logprobs: list[list[float]]  # log p(token) under softmax(logits[:vocab_size] / temperature), before truncation
    finish_reason: list[str]  # "stop" (emitted a stop id) or "length" (reached max_new_tokens)
    model_mask: list[list[bool]]  # per token: True if sampled, False if appended by a pause hook


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
        logp = logp.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logp


def sample_tokens(logits: torch.Tensor, temperature: float | torch.Tensor, top_k: int, top_p: float,
                  uniform: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one id per row: (ids [B], log p(ids) [B]) from logits [B, V] fp32.

    uniform [B] i.i.d. U(0, 1), or None for greedy (argmax; temperature unused): greedy is told by `uniform`, so
    temperature may be a 0-d tensor (the compiled step: no graph per value). Inverse CDF of the truncated p~:
    y = min{v : F(v) > u F(V)}, u F(V) kept below F(V) so rounding never picks an id with p~ = 0.
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


@dataclass
class Draw:
    """How a row's next token is drawn from its hidden state: logits over the head's first vocab_size rows, then
    `sample_tokens` (uniform None: greedy). The compiled decode step takes it whole: dynamo guards on top_k and
    top_p (constants of a run), while temperature is a 0-d tensor (no graph per value)."""

    vocab_size: int
    temperature: float | torch.Tensor
    top_k: int
    top_p: float
    uniform: torch.Tensor | None

    def __call__(self, model: Qwen2, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [B], log p [B]) of hidden states h [B, hidden]: the logits in fp32 from head rows < vocab_size."""
        logits = F.linear(h, model.lm_head.weight[: self.vocab_size]).float()
        return sample_tokens(logits, self.temperature, self.top_k, self.top_p, self.uniform)


def _decode_step(model: Qwen2, ids, attention_mask, position_ids, kv_cache, cache_position, draw: Draw):
    """Feed one token per row and draw the next: (ids [B], log p [B]); one function, so compile fuses sampling."""
    h = model.hidden_states(ids[:, None], attention_mask, position_ids[:, None], kv_cache, cache_position)
    return draw(model, h[:, -1])


@functools.cache
def _compiled_decode_step():
    """`_decode_step` under torch.compile, built on first use. The graphs over a whole run stay few: the batch B and
    the cache width are symbolic from the first call (marked dynamic); B never reaches 1 (`sample_tensors` keeps a
    finished row along, and a one-row call runs eager); the temperature is a 0-d tensor. So a run builds one greedy
    graph and one sampled graph per (top_k, top_p) it uses, below dynamo's recompile limit (8)."""
    compiled = torch.compile(_decode_step)
    built = set()

    def step(model, ids, attention_mask, position_ids, kv_cache, cache_position, draw: Draw):
        for t in (ids, attention_mask, position_ids, *kv_cache.k, *kv_cache.v, *[u for u in [draw.uniform] if u is not None]):
            torch._dynamo.maybe_mark_dynamic(t, 0)  # B
        for t in (attention_mask, *kv_cache.k, *kv_cache.v):
            torch._dynamo.maybe_mark_dynamic(t, 1 if t is attention_mask else 2)  # the cache's width
        graph = "greedy" if draw.uniform is None else f"sampled, top_k={draw.top_k}, top_p={draw.top_p:g}"
        t0 = time.time()
        out = compiled(model, ids, attention_mask, position_ids, kv_cache, cache_position, draw)
        if graph not in built:  # the first call of a graph compiles it: a one-time cost worth seeing
            built.add(graph)
            tqdm.write(f"torch.compile: decode step ({graph}) ready in {time.time() - t0:.1f} s, once per process",
                       file=sys.stderr)
        return out

    return step


def _check_prompts(model: Qwen2, prompts: list[list[int]], num_samples: int, vocab_size: int) -> None:
    cfg = model.config
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples}: must be >= 1")
    if not 1 <= vocab_size <= cfg.vocab_size:
        raise ValueError(f"vocab_size={vocab_size}: must lie in [1, {cfg.vocab_size}] (the model's embedding rows)")
    if len(prompts) == 0:
        raise ValueError("prompts: empty list; pass at least one prompt (a list of token ids)")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompts[{i}]: empty prompt; every prompt needs at least one token")
        if len(p) > cfg.max_position_embeddings:
            raise ValueError(f"prompts[{i}]: {len(p)} tokens exceeds the model's max_position_embeddings="
                             f"{cfg.max_position_embeddings}; truncate the prompt")
        if min(p) < 0 or max(p) >= cfg.vocab_size:
            raise ValueError(f"prompts[{i}]: token ids must lie in [0, {cfg.vocab_size}) for this model")


def generate(model: Qwen2, prompts: list[list[int]], num_samples: int = 1, params: SamplingParams | None = None,
             pause: PauseHook | None = None, progress: bool | None = None, share_prefix: bool = True) -> Samples:
    """Sample `num_samples` completions for each prompt (module docstring). A row ends at its first sampled stop id
    or after max_new_tokens. `progress`: a tqdm bar over generated tokens (None: when stderr is a terminal);
    `share_prefix=False` prefills every row separately (the same samples; for tests and benchmarks). The model runs
    in eval mode under inference_mode; its training flag is restored afterwards."""
    params = params or SamplingParams()
    vocab_size = params.vocab_size or model.config.vocab_size
    _check_prompts(model, prompts, num_samples, vocab_size)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            group, ids, logp, own = sample_tensors(model, prompts, num_samples, params, pause,
                                                   sys.stderr.isatty() if progress is None else progress, share_prefix)
    finally:
        model.train(was_training)
    # Cut each row after its first sampled stop id (a stop id inside an observation is not one).
    is_stop = torch.isin(ids, torch.tensor(params.stop_ids, dtype=torch.long, device=ids.device)) & own
    stopped = is_stop.any(-1)
    lengths = torch.where(stopped, is_stop.int().argmax(-1) + 1, params.max_new_tokens).tolist()
    return Samples(prompt_index=group.tolist(),
                   tokens=[t[:n] for t, n in zip(ids.tolist(), lengths)],
                   logprobs=[lp[:n] for lp, n in zip(logp.tolist(), lengths)],
                   finish_reason=["stop" if x else "length" for x in stopped.tolist()],
                   model_mask=[m[:n] for m, n in zip(own.tolist(), lengths)])


def _compact(live: _Rows, kv_cache: KVCache, appended: list, num_live: int, min_rows: int) -> list:
    """Drop finished rows from the batch and its cache, keeping min_rows (a kept finished row's tokens after its stop
    id are discarded like any row's); the kept rows' pending observations."""
    keep = (~live.done).nonzero().squeeze(-1)
    if num_live < min_rows:
        keep = torch.cat([keep, live.done.nonzero()[: min_rows - num_live, 0]]).sort().values
    kv_cache.select_rows(keep)
    live.select(keep)
    return [appended[i] for i in keep.tolist()] if appended else []


def _grow(live: _Rows, kv_cache: KVCache, columns: torch.Tensor, needed: int) -> torch.Tensor:
    """Widen the cache and the rows' masks by >= a quarter (observations past its end); the new column indices."""
    extra = max(needed, len(columns) // 4)
    kv_cache.grow(extra)
    live.mask = F.pad(live.mask, (0, extra), value=True)
    return torch.arange(len(columns) + extra, device=columns.device)


def sample_tensors(model: Qwen2, prompts: list[list[int]], num_samples: int, params: SamplingParams,
                   pause: PauseHook | None = None, progress: bool = False, share_prefix: bool = True,
                   first_step: int = 0) -> tuple[torch.Tensor, ...]:
    """The tensor loop of `generate`: (each row's prompt [N], ids [N, M], log-probs [N, M], sampled-token mask
    [N, M]), M = max_new_tokens, ids -1 where a row wrote nothing. Host syncs: the prefill's finite check, the stop
    checks (none without stop ids) and, with a pause hook, one per step. The dry run (sqlr1/dryrun.py) starts at
    `first_step`, the cache as wide as for step 0, to price the widest step alone."""
    device, M = model.lm_head.weight.device, params.max_new_tokens
    group, kv_cache, mask, logits = _prefill(model, prompts, num_samples, params, share_prefix)
    N, L, V = len(group), mask.shape[1] - M + 1, logits.shape[-1]
    compile = params.compile and pause is None and N >= 2  # a batch of 1 would be a graph of its own: eager
    step_fn = _compiled_decode_step() if compile else _decode_step
    temperature = torch.tensor(float(params.temperature), device=device) if compile else params.temperature
    min_rows = 2 if compile else 1  # compiled: compaction keeps a finished row along rather than reach batch 1
    stops = torch.tensor(params.stop_ids, dtype=torch.long, device=device)
    generator = torch.Generator(device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)

    def uniform(rows: torch.Tensor) -> torch.Tensor | None:  # one per original row and step: row r reads entry r
        return torch.rand(N, generator=generator, device=device)[rows] if params.temperature > 0 else None

    rows = torch.arange(N, device=device)
    first = sample_tokens(logits, params.temperature, params.top_k, params.top_p, uniform(rows))
    positions = torch.tensor([len(p) for p in prompts], device=device)[group]  # of each row's next token
    live = _Rows(rows, *first, positions, mask, torch.zeros(N, dtype=torch.bool, device=device),
                 torch.full((N,), first_step, device=device))
    out = (torch.full((N, M + 1), -1, dtype=torch.long, device=device),  # ids; finished rows write to column M
           torch.zeros(N, M + 1, device=device), torch.zeros(N, M + 1, dtype=torch.bool, device=device))
    columns = torch.arange(mask.shape[1], device=device)  # cache columns, on the device (no copy per step)
    col = L + first_step  # the cache column the next forward writes first (shared by every row)
    bar = tqdm(total=N * M, unit="tok", desc="sampling", disable=not progress)
    for step in range(first_step, M):
        live.record(out, stops, M)
        bar.update(len(live.rows))
        appended = live.pause(pause, out, M) if pause is not None else []  # host sync, every step
        if step == M - 1 or (pause is not None and bool(live.done.all())):  # each step adds >= 1 token per row
            break
        if (len(stops) or pause is not None) and (step + 1) % params.check_every == 0:
            num_live = int((~live.done).sum())  # the one host sync per check
            if num_live == 0:
                break
            if max(num_live, min_rows) < len(live.rows):
                appended = _compact(live, kv_cache, appended, num_live, min_rows)
        draw = Draw(V, temperature, params.top_k, params.top_p, uniform(live.rows))
        width = 1 + max(map(len, appended), default=0)
        if col + width > len(columns):  # observations took columns past the cache
            columns = _grow(live, kv_cache, columns, col + width - len(columns))
        if width == 1:  # a decode step: eager it reads the filled columns only, compiled the whole (static) width
            live.ids, live.logp = step_fn(model, live.ids, live.mask[:, : None if compile else col + 1],
                                          live.positions, kv_cache, columns[col : col + 1], draw)
            live.positions += 1
        else:
            live.ids, live.logp = _feed_observations(model, live, appended, kv_cache, columns[col : col + width],
                                                     draw)
        col += width
    bar.close()
    del kv_cache
    return group, *(t[:, :M] for t in out)


def _prefill(model: Qwen2, prompts: list[list[int]], G: int, params: SamplingParams, share_prefix: bool):
    """Prompts left-padded to the longest (L) -> (each row's prompt [P*G], its KVCache of L + M - 1 columns filled
    up to L, the mask over those columns [P*G, L + M - 1], the logits of each row's first token [P*G, V])."""
    weight = model.lm_head.weight
    device, P, M = weight.device, len(prompts), params.max_new_tokens
    L = max(len(p) for p in prompts)
    # Prompt i occupies columns L - len_i .. L-1. The mask's columns from L on are True: the causal mask hides
    # future columns, so single-turn decoding never updates it.
    ids = torch.zeros(P, L, dtype=torch.long, device=device)
    mask = torch.ones(P, L + M - 1, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p, device=device)
        mask[i, : L - len(p)] = False
    group = torch.arange(P, device=device).repeat_interleave(G)
    if not share_prefix:
        ids, mask = ids[group], mask[group]
    kv_cache = KVCache(model.config, ids.shape[0], L + M - 1, device=device, dtype=weight.dtype)
    h = model.hidden_states(ids, mask[:, :L], kv_cache=kv_cache, cache_position=torch.arange(L, device=device))
    logits = F.linear(h[:, -1], weight[: params.vocab_size or model.config.vocab_size]).float()
    if not bool(torch.isfinite(logits).all()):  # one host sync: sampling NaN logits gives garbage or index errors
        bad = (~torch.isfinite(logits).all(-1)).nonzero().flatten().tolist()
        raise NonFiniteLogitsError(f"the model's logits are NaN or infinite (batch rows {bad[:5]}): its weights are "
                                   "broken (NaN or inf in the checkpoint?) or overflow its dtype")
    if share_prefix and G > 1:
        kv_cache.select_rows(group)
        mask, logits = mask[group], logits[group]
    return group, kv_cache, mask, logits


@dataclass
class _Rows:
    """The live rows' decoding state, [B] each (mask [B, S]): compaction keeps a subset of them."""

    rows: torch.Tensor  # original row id
    ids: torch.Tensor  # the token each row feeds next
    logp: torch.Tensor  # its log-prob
    positions: torch.Tensor  # its RoPE position
    mask: torch.Tensor  # the cache columns it sees
    done: torch.Tensor  # emitted a stop id or reached max_new_tokens
    n_out: torch.Tensor  # its completion's length so far

    def select(self, keep: torch.Tensor) -> None:
        for name in ("rows", "ids", "logp", "positions", "mask", "done", "n_out"):
            setattr(self, name, getattr(self, name).index_select(0, keep))

    def record(self, out: tuple[torch.Tensor, ...], stops: torch.Tensor, M: int) -> None:
        """Write each row's sampled token into out = (ids, log-probs, sampled) at its position (a finished row writes
        to the scratch column M) and update done."""
        at = torch.where(self.done, M, self.n_out)
        out[0][self.rows, at], out[1][self.rows, at], out[2][self.rows, at] = self.ids, self.logp, True
        self.n_out += ~self.done
        self.done |= torch.isin(self.ids, stops) | (self.n_out >= M)

    def pause(self, pause: PauseHook, out: tuple[torch.Tensor, ...], M: int) -> list[list[int]]:
        """Rows that just sampled a pause id -> the hook; its tokens join their completions (unsampled, log-prob 0),
        cut to each row's remaining budget. Returns every live row's appended tokens ([] for most)."""
        paused = torch.isin(self.ids, torch.tensor(pause.ids, dtype=torch.long, device=self.ids.device)) & ~self.done
        paused = paused.nonzero().squeeze(-1).tolist()
        appended = [[] for _ in range(len(self.rows))]
        ids_of, lengths = self.rows[paused].tolist(), self.n_out[paused].tolist()
        got = pause(ids_of, [out[0][r, :n].tolist() for r, n in zip(ids_of, lengths)]) if paused else []
        if len(got) != len(paused):
            raise ValueError(f"the pause hook returned {len(got)} token lists for {len(paused)} paused rows")
        for b, r, n, tokens in zip(paused, ids_of, lengths, got):
            appended[b] = list(tokens)[: M - n]  # an observation counts against the row's budget
            out[0][r, n : n + len(appended[b])] = torch.tensor(appended[b], dtype=torch.long, device=out[0].device)
        self.n_out += torch.tensor([len(a) for a in appended], device=self.n_out.device)
        self.done |= self.n_out >= M
        return appended


def _feed_observations(model: Qwen2, live: _Rows, appended: list[list[int]], kv_cache: KVCache,
                       cache_position: torch.Tensor, draw: Draw) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of width W at cache columns `cache_position`: row b feeds [y_b, o_1..o_kb, pad..] (its columns
    past 1 + k_b masked out for good) and draws its next token from its output at position k_b."""
    B, W, device = len(live.ids), len(cache_position), live.ids.device
    k = torch.tensor([len(a) for a in appended], device=device)
    span = torch.arange(W, device=device)
    ids = torch.zeros(B, W, dtype=torch.long, device=device)
    ids[:, 0] = live.ids
    for b, tokens in enumerate(appended):
        ids[b, 1 : 1 + len(tokens)] = torch.tensor(tokens, dtype=torch.long, device=device)
    live.mask[:, cache_position] = span[None] <= k[:, None]
    h = model.hidden_states(ids, live.mask[:, : cache_position[-1] + 1], live.positions[:, None] + span, kv_cache,
                            cache_position)
    live.positions += 1 + k
    return draw(model, h.gather(1, k[:, None, None].expand(-1, 1, h.shape[-1]))[:, 0])  # each row's last fed token
