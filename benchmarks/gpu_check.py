"""GPU check: bf16 numerics, decode speed against the memory roofline, and the dry run's memory predictions against
what train.py measures, in one table.

    python benchmarks/gpu_check.py                  # a GPU node: real Qwen2.5 shapes, 8 min at most on one H100
    python benchmarks/gpu_check.py --tiny           # tiny shapes (the default without CUDA): ~20 s on 2 CPU cores
    python benchmarks/gpu_check.py --out check.md   # also write the table to a file

Nothing is downloaded: weights are random at the real shapes, the data is a small toy world built in a temporary
directory. Each part runs in a subprocess with its own time limit (full shapes: 60 + 200 + 220 s = 8 min), so a
hang or a crash in one still leaves the others' rows; the exit code is 1 only when a part (or train.py) crashed or
ran out of time. Times below are estimates for one H100 and a 16-core host.

(a) numerics, ~30 s: a Qwen2.5-7B-shaped model cut to 2 layers (+ untied head) and the whole Qwen2.5-0.5B shape,
    bf16 on the device against fp32 on the CPU (the same weights): logits of a masked prefill and of one decode step
    through the KV cache. Reference: the error the bf16-rounded weights alone cause (run in fp32 on the CPU).
(b) decode, ~2-3 min (mostly torch.compile's one-time build at 7B): the sampler (`generate`, no stop ids) on the
    Qwen2.5-7B shape, bf16, at batch 1, 8 and 64, eager and compiled (batch 1 is always eager: the sampler never
    compiles a one-row batch). Roofline: bytes a decode step must read (every weight once, the KV cache's filled
    columns) / the device's measured copy bandwidth.
(c) train.py, ~2.5 min (half of it compiling the decode step, greedy and sampled): 3 GRPO steps of a random
    Qwen2.5-0.5B-shaped model (151,936 embedding rows) on the toy world through the real CLI, in a subprocess; each
    phase's peak (`torch.cuda.max_memory_allocated`, in metrics.jsonl) beside the dry run's prediction for the same
    config, computed meanwhile on the CPU.
(d) the same for train.py's evaluation passes (greedy, then voted).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_sampling import best_times  # noqa: E402
from sqlr1.dryrun import KNOWN_MODELS  # noqa: E402
from sqlr1.model import KVCache, ModelConfig, Qwen2, num_params  # noqa: E402
from sqlr1.toyworld import tiny_config  # noqa: E402

GiB = 2**30
CONFIG = ROOT / "configs" / "grpo_tiny.py"  # train.py's base config for (c), its sizes overridden below
QWEN25_7B = ModelConfig(**KNOWN_MODELS["Qwen/Qwen2.5-7B-Instruct"][0])
QWEN25_05B = ModelConfig(**KNOWN_MODELS["Qwen/Qwen2.5-0.5B"][0])

# Verdict rules (also printed under the table)
NUMERICS_MAX = 3.0  # (a) bf16 error <= 3x the error of the bf16-rounded weights alone (bf16 arithmetic ~doubles it)
COPY_MIN = 0.6  # (b) measured copy bandwidth >= 60 % of the data sheet's (HBM copies reach ~80-90 %)
DECODE_MIN = {False: 0.2, True: 0.5}  # (b) fraction of the roofline: eager (launch-bound at small batch), compiled
MEMORY_RANGE = (0.5, 1.05)  # (c, d) measured / predicted peak: the dry run is a worst case, and must not under-predict
# Data-sheet memory bandwidth (bytes/s) by device name, first match wins
SPEC_BANDWIDTH = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12),
                  ("A100 80GB", 1.94e12), ("A100-SXM4-80GB", 2.04e12), ("A100", 1.56e12))
# train.py's phases -> the dry-run phases each one spans (its prediction: their max); "reward" runs on the host
PREDICTED_BY = {"rollout": ("rollout",), "reward": (), "train": ("reference", "old logp", "update", "optimizer"),
                "reference": ("reference",), "old logp": ("old logp",), "update": ("update",),
                "optimizer": ("optimizer",), "eval": ("eval greedy", "eval voted")}


@dataclass
class Scale:
    """What each part runs: the full shapes for a GPU, or tiny ones for a CPU (the test suite)."""

    name: str  # "full" | "tiny"
    numerics: list[tuple[str, ModelConfig]]  # (a) models compared, named
    tokens: int  # (a) prefill length
    decode: tuple[str, ModelConfig]  # (b) the model decoded
    prompt_len: int  # (b)
    new_tokens: int  # (b)
    repeats: int  # (b) timed rounds (best kept), after a warm-up
    copy_bytes: int  # (b) size of the tensor whose copy measures bandwidth
    world: dict  # (c) build_toyworld's sizes
    train_model: Callable[[int], ModelConfig]  # (c) the model's shape, given the toy tokenizer's size
    train_name: str
    train_args: list[str]  # (c) train.py overrides (beyond data, model and run directory)
    budget: dict[str, int]  # seconds per part (its subprocess is killed after)


TRAIN_COMMON = ["--sft_steps=0", "--dtype=bfloat16", "--gradient_checkpointing=true", "--grpo.kl_coef=0.001",
                "--lr=1e-6", "--max_prompt_len=256", "--eval_split=dev", "--eval_vote=always", "--log_samples=0"]

FULL = Scale(
    "full",
    numerics=[("Qwen2.5-7B shape, 2 of 28 layers + head", replace(QWEN25_7B, num_hidden_layers=2)),
              ("Qwen2.5-0.5B shape, 24 layers + tied head", QWEN25_05B)],
    tokens=128, decode=("Qwen2.5-7B", QWEN25_7B), prompt_len=256, new_tokens=128, repeats=2, copy_bytes=GiB,
    world=dict(num_train_dbs=4, num_dev_dbs=2, train_questions_per_db=8, dev_questions_per_db=8),
    train_model=lambda vocab: QWEN25_05B, train_name="Qwen2.5-0.5B-shaped",
    train_args=TRAIN_COMMON + ["--grpo_steps=3", "--prompts_per_step=8", "--group_size=8", "--micro_batch_size=8",
                               "--max_response_len=256", "--eval_limit=16", "--eval_batch_size=8", "--eval_n=8"],
    budget={"a": 60, "b": 200, "c": 220},
)
TINY_MODEL = ModelConfig(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=False)
TINY = Scale(
    "tiny",
    numerics=[("tiny, 2 layers + untied head", TINY_MODEL),
              ("tiny, 4 layers + tied head", replace(TINY_MODEL, num_hidden_layers=4, tie_word_embeddings=True))],
    tokens=32, decode=("tiny", replace(TINY_MODEL, num_hidden_layers=4)), prompt_len=32, new_tokens=16, repeats=1,
    copy_bytes=64 * 2**20,
    world=dict(num_train_dbs=2, num_dev_dbs=1, train_questions_per_db=4, dev_questions_per_db=2),
    train_model=tiny_config, train_name="tiny",
    train_args=TRAIN_COMMON + ["--grpo_steps=2", "--prompts_per_step=2", "--group_size=2", "--micro_batch_size=2",
                               "--max_response_len=16", "--eval_limit=2", "--eval_batch_size=2", "--eval_n=2",
                               "--sandbox_workers=1"],
    budget={"a": 60, "b": 60, "c": 150},
)


@dataclass
class Row:
    part: str
    what: str
    measured: str
    reference: str
    ratio: float | None
    verdict: str


Emit = Callable[[Row], None]


# ---------------------------------------------------------------------------------------------------- helpers


def random_model(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> Qwen2:
    """A Qwen2 allocated directly in `dtype` on `device`, init_weights' random draw made there (fast on a GPU)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2(config)
    finally:
        torch.set_default_dtype(default)
    model.init_weights(generator=torch.Generator(device).manual_seed(0))
    return model.eval()


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= 0.1 * GiB else f"{n / 2**20:.1f} MiB"


def in_range(ratio: float, lo: float, hi: float = math.inf) -> bool:
    return lo <= ratio <= hi  # False for NaN


# ---------------------------------------------------------------------------------------------------- (a) numerics


def logits(model: Qwen2, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 CPU logits of a prefill of ids[:, :-1] into a KV cache ([B, T, V]) and of the decode step feeding
    ids[:, -1] ([B, V]), on the model's device; mask [B, T + 1] marks left padding."""
    device, (B, T1) = model.lm_head.weight.device, ids.shape
    ids, mask = ids.to(device), mask.to(device)
    cache = KVCache(model.config, B, T1, device=device, dtype=model.lm_head.weight.dtype)
    with torch.inference_mode():
        prefill = model(ids[:, :-1], mask[:, :-1], kv_cache=cache, cache_position=torch.arange(T1 - 1, device=device))
        decode = model(ids[:, -1:], mask, kv_cache=cache, cache_position=torch.tensor([T1 - 1], device=device))
    return prefill.float().cpu(), decode[:, 0].float().cpu()


def errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(max |got - want| / max |want|, mean |got - want| / mean |want|): errors relative to the logits' scale (an
    elementwise relative error is unbounded near zero)."""
    err = (got - want).abs()
    return float(err.max() / want.abs().max()), float(err.mean() / want.abs().mean())


def part_numerics(scale: Scale, device: torch.device, emit: Emit) -> None:
    """(a) bf16 on `device` vs fp32 on the CPU, same weights; the bf16-rounded weights in fp32 as the reference."""
    T = scale.tokens
    for name, config in scale.numerics:
        fp32 = random_model(config, device, torch.float32)
        bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
        rounded = copy.deepcopy(bf16).to("cpu", torch.float32)
        fp32 = fp32.cpu()
        ids = torch.randint(0, config.vocab_size, (4, T + 1), generator=torch.Generator().manual_seed(1))
        mask = torch.ones(4, T + 1, dtype=torch.long)
        for row, pad in enumerate((0, T // 8, T // 4, T // 2)):  # left padding: the masked attention path
            mask[row, :pad] = 0
        got, want, floor = logits(bf16, ids, mask), logits(fp32, ids, mask), logits(rounded, ids, mask)
        del fp32, bf16, rounded
        real = mask[:, :T].bool()
        for i, what in enumerate((f"prefill logits, 4 x {T} tokens, 3 rows left-padded",
                                  "decode-step logits through the KV cache")):
            pick = (lambda x: x[real]) if i == 0 else (lambda x: x)
            mx, mean = errors(pick(got[i]), pick(want[i]))
            ref_mx, ref_mean = errors(pick(floor[i]), pick(want[i]))
            ratio = max(mx / ref_mx, mean / ref_mean)
            emit(Row("a", f"{name}: {what}; bf16 on {device.type} vs fp32 on cpu",
                     f"rel. err max {mx:.2%}, mean {mean:.2%}",
                     f"bf16 weights in fp32: max {ref_mx:.2%}, mean {ref_mean:.2%}", ratio,
                     "ok" if in_range(ratio, 0, NUMERICS_MAX) else "check"))


# ---------------------------------------------------------------------------------------------------- (b) decode


def spec_bandwidth(device: torch.device) -> tuple[str, float | None]:
    """(device name, data-sheet bandwidth in bytes/s or None when unknown)."""
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((bw for key, bw in SPEC_BANDWIDTH if key in name), None)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 5) -> float:
    """Bytes/s of a copy of an `nbytes` tensor on the device (read + write)."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    return 2 * nbytes / best_times({"copy": lambda: y.copy_(x)}, device, repeats)["copy"]


def step_bytes(model: Qwen2, batch: int, columns: float) -> float:
    """Bytes a decode step must read: every weight once (an untied embedding only at the fed rows: nothing) and the
    keys and values of `columns` cache columns per row."""
    c, size = model.config, model.lm_head.weight.element_size()
    weights = num_params(model) - (0 if c.tie_word_embeddings else model.embed_tokens.weight.numel())
    kv = 2 * c.num_hidden_layers * batch * c.num_key_value_heads * columns * c.head_dim
    return (weights + kv) * size


def sample(model: Qwen2, batch: int, prompt_len: int, new_tokens: int, compile: bool) -> None:
    """`generate` on `batch` random prompts of `prompt_len` tokens, no stop ids: every row makes `new_tokens`."""
    from sqlr1.sampling import SamplingParams, generate

    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len),
                            generator=torch.Generator().manual_seed(2)).tolist()
    generate(model, prompts, 1, SamplingParams(new_tokens, temperature=1.0, seed=0, compile=compile), progress=False)


def decode_step_seconds(model: Qwen2, batch: int, scale: Scale, compile: bool) -> float:
    """Seconds per decode step: (M new tokens - 1 new token) / (M - 1), best of scale.repeats each."""
    t = best_times({n: lambda n=n: sample(model, batch, scale.prompt_len, n, compile) for n in (scale.new_tokens, 1)},
                   model.lm_head.weight.device, scale.repeats)
    return (t[scale.new_tokens] - t[1]) / (scale.new_tokens - 1)


def part_decode(scale: Scale, device: torch.device, emit: Emit) -> None:
    """(b) the device's copy bandwidth, then decode tokens/s against the roofline it gives, eager and compiled."""
    name, spec = spec_bandwidth(device)
    bandwidth = copy_bandwidth(device, scale.copy_bytes)
    ratio = bandwidth / spec if spec else None
    emit(Row("b", f"memory bandwidth of {name}: copy of a {fmt_bytes(scale.copy_bytes)} tensor (read + write)",
             f"{bandwidth / 1e9:.0f} GB/s", f"data sheet {spec / 1e9:.0f} GB/s" if spec else "data sheet: unknown",
             ratio, "info" if ratio is None else "ok" if in_range(ratio, COPY_MIN) else "check"))
    model_name, config = scale.decode
    model = random_model(config, device, torch.bfloat16)
    columns = scale.prompt_len + scale.new_tokens / 2  # the filled cache columns, on average over the decode steps
    shape = f"{model_name} bf16, prompt {scale.prompt_len} + {scale.new_tokens} new tokens"
    for compile in (False, True):
        if compile:  # the first compiled call builds the graph; its batch is symbolic: one build for 8 and 64
            t0 = time.perf_counter()
            sample(model, 2, scale.prompt_len, 3, compile=True)
            emit(Row("b", f"torch.compile of the decode step ({model_name}), once per process",
                     f"{time.perf_counter() - t0:.0f} s", "-", None, "info"))
        for batch in (1, 8, 64):
            if compile and batch == 1:
                continue
            seconds = decode_step_seconds(model, batch, scale, compile)
            need = step_bytes(model, batch, columns)
            roofline = batch * bandwidth / need
            fraction = batch / seconds / roofline
            verdict = ("info (tiny)" if scale.name == "tiny" else
                       "ok" if in_range(fraction, DECODE_MIN[compile]) else "check")
            mode = "compiled" if compile else "eager" + (" (the sampler never compiles one row)" if batch == 1 else "")
            emit(Row("b", f"decode tok/s, {shape}, batch {batch}, {mode}",
                     f"{batch / seconds:,.0f} tok/s", f"roofline {roofline:,.0f} tok/s ({fmt_bytes(need)} per step)",
                     fraction, verdict))


# ---------------------------------------------------------------------------------------------------- (c), (d) train.py


def memory_row(part: str, phase: str, measured_gib: float | None, predicted: dict[str, dict[str, int]],
               judge: bool = True, missing: str = "no CUDA") -> Row:
    """A train.py phase's measured peak (GiB; None: not logged, for the reason `missing`) beside the dry run's
    prediction (bytes per phase); judged by MEMORY_RANGE unless `judge` is False (tiny shapes: a few MiB, where
    allocator slack dominates)."""
    spans = [p for p in PREDICTED_BY[phase] if p in predicted]
    want = max((predicted[p]["total"] for p in spans), default=None)
    what = f"peak memory, train.py phase '{phase}'" + (f" (dry run: {' / '.join(spans)})" if spans else "")
    got = None if measured_gib is None else measured_gib * GiB
    ratio = got / want if got is not None and want else None
    if got is None:
        verdict = f"n/a ({missing})"
    elif want is None or not judge:
        verdict = "info" if judge else "info (tiny)"
    elif in_range(ratio, *MEMORY_RANGE):
        verdict = "ok"
    else:
        verdict = "check: over the prediction" if not ratio < MEMORY_RANGE[0] else "loose"
    return Row(part, what, "-" if got is None else fmt_bytes(got),
               "no dry-run phase" if want is None else fmt_bytes(want), ratio, verdict)


def peak(records: list[dict], phase: str) -> float | None:
    """The largest `peak_mem_<phase>_gib` the records carry (train.py logs them on CUDA only), or None."""
    key = f"peak_mem_{phase.replace(' ', '_')}_gib"
    return max((r[key] for r in records if key in r), default=None)


def part_train(scale: Scale, device: torch.device, emit: Emit, work: Path, deadline: float) -> None:
    """(c) and (d): train.py runs in a subprocess while this process runs the dry run of the same config."""
    from sqlr1.checkpoint import save_model
    from sqlr1.config import load_config
    from sqlr1.dryrun import dry_run
    from sqlr1.run import read_records
    from sqlr1.tokenizer import load_tokenizer
    from sqlr1.toyworld import build_toyworld, resolve_config

    world = build_toyworld(work / "world", seed=0, **scale.world)
    tokenizer = load_tokenizer(world / "tokenizer")
    # toyworld.init_model's checkpoint, its random draw made on the device (0.5B on a CPU: ~20 s)
    weights = random_model(scale.train_model(tokenizer.vocab_size), device, torch.float32).cpu()
    model = save_model(weights, work / "model", tokenizer=tokenizer)
    del weights
    if device.type == "cuda":  # the draw's device memory back to the GPU before train.py starts
        torch.cuda.empty_cache()
    run_dir = work / "run"
    overrides = [f"--data_root={world}", f"--model={model}", f"--out_dir={run_dir}", "--device=auto",
                 *scale.train_args]
    t0 = time.time()
    train = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", str(CONFIG), *overrides], cwd=ROOT)
    try:
        cfg = resolve_config(load_config(CONFIG, overrides))
        gpu_gib = torch.cuda.get_device_properties(device).total_memory / GiB if device.type == "cuda" else 80.0
        predicted = dry_run(cfg, gpus=1, gpu_mem_gb=gpu_gib).rows
        rc = train.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        if train.poll() is None:  # SIGTERM: train.py stops like on Ctrl-C, its sandbox workers with it
            train.terminate()
            try:
                train.wait(timeout=15)
            except subprocess.TimeoutExpired:
                train.kill()
    seconds = time.time() - t0
    records = read_records(run_dir)
    steps = [r for r in records if r["stage"] == "grpo"]
    evals = [r for r in records if r["stage"].startswith("eval:")]
    status = "timed out" if rc is None else f"exit {rc}"
    for part, what, done, want in (("c", "GRPO steps", len(steps), cfg.grpo_steps),
                                   ("d", "evaluations (before and after GRPO; greedy, then voted)", len(evals), 2)):
        emit(Row(part, f"train.py, {scale.train_name} random model on the toy world ({device.type}, bf16): {what}",
                 f"{done} (run: {seconds:.0f} s, {status})", f"{want}", done / want,
                 "ok" if rc == 0 and done == want else "FAILED"))
    for phase in PREDICTED_BY:
        records_of = evals if phase == "eval" else steps
        measured = peak(records_of, phase)
        if measured is not None or any(p in predicted for p in PREDICTED_BY[phase]):
            emit(memory_row("d" if phase == "eval" else "c", phase, measured, predicted, scale.name != "tiny",
                            "no CUDA" if device.type == "cpu" else "not logged"))


# ---------------------------------------------------------------------------------------------------- the parts


def run_part(part: str, scale: Scale, rows_file: Path, work: Path, deadline: float) -> None:
    """One part in this process, each row appended to `rows_file` as it is made (a timeout keeps the rows made)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if scale.name == "tiny":  # dynamo still traces the decode step; inductor's C++ build would take ~25 s of 2 cores
        torch.compiler.set_default_backend("eager")
    work.mkdir(parents=True, exist_ok=True)

    def emit(row: Row) -> None:
        with rows_file.open("a") as f:
            f.write(json.dumps(asdict(row)) + "\n")

    if part == "a":
        part_numerics(scale, device, emit)
    elif part == "b":
        part_decode(scale, device, emit)
    else:
        part_train(scale, device, emit, work, deadline)


def part_process(part: str, scale: Scale, work: Path) -> list[Row]:
    """Run a part in a subprocess (its own process group, killed whole at its time limit); its rows, and a FAILED
    row when it crashed or ran out of time. Its output goes to stderr: stdout is the table's."""
    budget = scale.budget[part]
    rows_file = work / f"rows_{part}.jsonl"
    deadline = time.time() + budget - 25  # train.py's (part c): time left to stop it and report what it logged
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--rows", str(rows_file), "--work",
           str(work / part), "--deadline", str(deadline), *(["--tiny"] if scale.name == "tiny" else [])]
    print(f"gpu_check: part ({part}), time limit {budget} s", file=sys.stderr, flush=True)
    tiny = {"OMP_NUM_THREADS": "1"} if scale.name == "tiny" else {}  # tiny shapes: threads only contend
    proc = subprocess.Popen(cmd, stdout=sys.stderr, start_new_session=True, env={**os.environ, **tiny})
    try:
        rc = proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        rc = None
    finally:  # a timeout, or Ctrl-C here (the part, in its own session, does not get it): end the whole group
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    rows = [Row(**json.loads(line)) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
    if rc != 0:
        why = f"timed out after {budget} s" if rc is None else f"crashed (exit {rc}; its traceback is on stderr)"
        rows.append(Row(part, f"part ({part}) {why}", "-", "-", None, "FAILED"))
    return rows


def rules() -> str:
    """The verdict rules, printed under the table."""
    lo, hi = MEMORY_RANGE
    return (
        "Rules. (a) ratio: bf16's error (max and mean, relative to the scale of the fp32 logits) over the error that\n"
        "rounding the weights to bf16 alone causes, the worse of the two; ok <= "
        f"{NUMERICS_MAX:g} (a wrong kernel, mask or position: ~100x).\n"
        "(b) roofline: the bytes a decode step must read (every weight once, the filled KV-cache columns) / the\n"
        f"measured copy bandwidth; ratio: tokens/s over the roofline's; ok >= {DECODE_MIN[True]:g} compiled, "
        f">= {DECODE_MIN[False]:g} eager (launch-bound\nat small batch); the copy itself ok at >= {COPY_MIN:g} of the "
        "data sheet. (c, d) ratio: the measured peak\n(torch.cuda.max_memory_allocated, the largest over the steps "
        "or evaluations) over the dry run's prediction\nfor the same config; ok in "
        f"[{lo:g}, {hi:g}]: the dry run is a worst case (every prompt max_prompt_len, every row\ndecoding to "
        "max_response_len; the toy prompts have ~150-210 of max_prompt_len=256 tokens) and must not\n"
        f'under-predict ("check" above {hi:g}); "loose" below {lo:g}: safe, but a poor guide.\n'
        "Tiny shapes: the plumbing only, no speed or memory verdicts."
    )


def markdown(rows: list[Row], scale: Scale, seconds: float) -> str:
    where = "cuda" if torch.cuda.is_available() else "cpu"
    lines = [f"GPU check: {scale.name} shapes on {where}, torch {torch.__version__}, {seconds:.0f} s", "",
             "| part | what | measured | reference / prediction | ratio | verdict |", "|---|---|---|---|---|---|"]
    lines += [f"| ({r.part}) | {r.what} | {r.measured} | {r.reference} | "
              f"{'-' if r.ratio is None else f'{r.ratio:.2f}'} | {r.verdict} |" for r in rows]
    return "\n".join(lines + ["", rules()]) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (the default without CUDA)")
    ap.add_argument("--out", help="also write the table to this markdown file")
    ap.add_argument("--part", choices=("a", "b", "c"), help=argparse.SUPPRESS)  # one part, in a subprocess
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    scale = TINY if args.tiny or not torch.cuda.is_available() else FULL
    if args.part:
        run_part(args.part, scale, Path(args.rows), Path(args.work), args.deadline)
        return 0
    t0, rows = time.time(), []
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as work:
        for part in scale.budget:
            rows += part_process(part, scale, Path(work))
    table = markdown(rows, scale, time.time() - t0)
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return 1 if any(r.verdict == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
