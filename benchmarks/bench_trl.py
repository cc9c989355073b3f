"""TRL's GRPOTrainer as an independent referee: our GRPO and TRL's, from the same SFT weights, on the same task.

    python benchmarks/bench_trl.py --make_sft --seeds 0 1 2 --out trl.md      # SFT from the lab's cache, K = 100
    python benchmarks/bench_trl.py --sft runs/s0/final runs/s1/final --seeds 0 1 --steps 20 --out trl.md

Needs the `bench` extra (`pip install -e ".[bench,plots]"`: TRL, pinned); sqlr1/ never imports it. For each seed S,
from the SAME SFT checkpoint (our Hugging Face-layout `final/`, read by our loader for us, by transformers for TRL):

  (a) ours:  `train.py --config configs/grpo_tiny.py --model=<sft> --sft_steps=0 --grpo_steps=K --seed=S`
      (a subprocess with its own run directory; held-out evaluation left to this script: --eval_split=);
  (b) TRL:   `trl.GRPOTrainer` matched to (a) (`run_trl`), the prompts of (a) as plain text and (a)'s reward;
  (c) both final models loaded by `sqlr1.checkpoint.load_model` and scored by `sqlr1.inference.evaluate_policy`
      (greedy, all held-out questions of the toy world, the same call for both).

Reported, in one run: held-out greedy EX after K steps per seed and its mean with a 95 % Student-t CI over seeds
(n - 1 df), the mean reward per step (table + `<out>.png`), and seconds per GRPO step split into rollout / reward /
update for both, with the ratio TRL s/step / ours s/step. Both sides run in the same process run with the same
thread count (`--threads`: torch.set_num_threads here, OMP_NUM_THREADS for the subprocess).

The two are matched setting by setting (batch, loss normalisation, advantages, optimizer and schedule, prompts,
stop tokens, padded vocabulary rows, data order): `run_trl`'s docstring lists how, and `per_step`'s how each side
is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train as sqlr1_train  # noqa: E402
from sqlr1 import toyworld  # noqa: E402
from sqlr1.checkpoint import load_model  # noqa: E402
from sqlr1.config import load_config  # noqa: E402
from sqlr1.distributed import Dist  # noqa: E402
from sqlr1.inference import evaluate_policy  # noqa: E402
from sqlr1.lab import mean_ci, sft_checkpoint  # noqa: E402
from sqlr1.reward import score_batch  # noqa: E402
from sqlr1.sandbox import Sandbox  # noqa: E402
from sqlr1.sql_env import SqlEnv, model_text  # noqa: E402
from sqlr1.tokenizer import load_tokenizer  # noqa: E402
from sqlr1.update import new_optimizer  # noqa: E402

CONFIG = ROOT / "configs" / "grpo_tiny.py"

def pm(xs: list[float], sign: str = "") -> str:
    """mean ± half-width of the 95 % CI over seeds (sqlr1.lab.mean_ci: Student's t); one seed has no interval."""
    m, h = mean_ci(xs)
    return f"{m:{sign}.3f} ± {h:.3f}" if h is not None else f"{m:{sign}.3f} (1 seed, no CI)"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_train(args: list[str], threads: int, log: Path) -> None:
    """train.py in a subprocess (its own process: no state shared with TRL's side), output to `log`."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    with log.open("w") as f:
        p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(CONFIG), *args], cwd=ROOT,
                           env=env, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode:
        raise SystemExit(f"error: train.py {' '.join(args)} failed (exit {p.returncode}); see {log}")


def make_sft(seed: int, sft_steps: int | None, cache_dir: str) -> Path:
    """The cold start for `seed`: grpo_tiny's own SFT run (sft.json, its sft_steps unless --sft_steps), from the lab's
    cache (sqlr1.lab.sft_checkpoint: same cache, same key). Not configs/lab_toy.py's (sft_noisy.json, 900 steps)."""
    overrides = [] if sft_steps is None else [f"--sft_steps={sft_steps}"]
    return sft_checkpoint(CONFIG.relative_to(ROOT), overrides, seed, cache_dir)


def run_ours(sft: Path, seed: int, steps: int, out: Path, threads: int) -> dict:
    """(a): K GRPO steps of train.py from `sft`; the per-step reward and time split from its metrics.jsonl."""
    run_dir = out / f"ours_s{seed}"
    t0, load0 = time.time(), os.getloadavg()[0]
    run_train([f"--model={sft}", "--sft_steps=0", f"--grpo_steps={steps}", f"--seed={seed}", "--eval_split=",
               f"--out_dir={run_dir}"], threads, out / f"ours_s{seed}.log")
    wall = time.time() - t0
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    recs = [r for r in recs if r.get("stage") == "grpo"]
    return {"model": run_dir / "final", "reward": [r["reward"] for r in recs], "wall": wall,
            "load": (load0, os.getloadavg()[0]),
            "rollout": [r["time_rollout"] for r in recs], "reward_time": [r["time_reward"] for r in recs],
            "update": [r["time_train"] for r in recs]}


def rl_data(cfg, tokenizer, sandbox: Sandbox):
    """train.py's GRPO data (`train.load_split` + `train.rl_data`): the train examples it keeps, with their rendered
    prompts."""
    split = sqlr1_train.rl_data(sqlr1_train.load_split(cfg, tokenizer, cfg.train_split), sandbox, cfg, Dist())
    return split.examples, split.prompts


def check_hf_logits(sft: Path, prompt_ids: list[int]) -> float:
    """max |logits_transformers - logits_ours| on one prompt: our checkpoint must mean the same model to TRL."""
    from transformers import AutoModelForCausalLM

    ours = load_model(sft, dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32)
    x = torch.tensor([prompt_ids])
    with torch.no_grad():
        diff = (ours(x).float() - hf(x).logits.float()).abs().max().item()
    if diff > 1e-3:
        raise SystemExit(f"error: {sft}: transformers' logits differ from ours by {diff:.2e}; the export is broken")
    return diff


def run_trl(sft: Path, seed: int, steps: int, out: Path, cfg, examples, prompts, tokenizer, sandbox: Sandbox) -> dict:
    """(b): K steps of TRL's GRPOTrainer from `sft`, the same prompts per step, our reward; the model saved to disk.

    How TRL is made to run what train.py runs (TRL 1.16.0, transformers 5.24.0):
    - Batch: 8 prompts x G = 8 per optimizer step. TRL: per_device_train_batch_size=16, gradient_accumulation_steps=4 (=
      our micro_batch_size 16 x 4 micro-batches), steps_per_generation defaults to 4, so one generation batch of 64 = 8
      prompts x 8 completions feeds one optimizer step; num_iterations=1 (one pass). With one pass TRL takes pi_old =
      the current forward, detached (rho = 1): the same as ours (recompute_old_logp at ppo_epochs 1).
    - Loss normalisation. Ours (token-mean): L = sum_{i,t} m_it l_it / sum_{i,t} m_it over all 64 completions of the
      step, whatever the micro-batching. TRL's loss types (grpo_trainer.py, `_compute_loss`): "grpo" and "sapo" average
      per sequence then over sequences; "bnpo" divides by the tokens of the local micro-batch (token-mean per
      micro-batch: a trap); "dr_grpo" by B x max_completion_length; "dapo" (and "cispo") divide every micro-batch's sum
      by `num_items_in_batch` = the completion tokens of the whole generation batch (x GA / steps_per_generation = 1
      here), and GRPOTrainer sets `loss_is_scaled_for_ga = True`, so the Trainer does not divide by GA again. Summed
      over the 4 accumulated micro-batches that is sum m l / sum m over the step: loss_type="dapo" equals ours.
    - Advantages: scale_rewards="group", TRL's nanstd is unbiased (count / (count - 1)), as our std_unbiased=True. TRL
      adds eps 1e-4 to the std, ours 1e-6 (rewards here differ by >= 0.1 within a mixed group: negligible).
    - beta = 0 (no reference model on either side), epsilon = 0.2 both ways, temperature 1.0, top_p 1, top_k 0,
      max_completion_length 128 = our max_response_len (truncated completions keep all 128 tokens in the loss on both
      sides: mask_truncated_completions=False), fp32 on the CPU (bf16 off), max_grad_norm 1.0, no vLLM, seed S.
    - Optimiser: the same object kind on both sides, from `sqlr1.update.new_optimizer` for K GRPO steps (torch AdamW,
      betas 0.9/0.999, eps 1e-8, weight decay 0; constant lr with linear warmup), passed as
      `optimizers=(adamw, schedule)`. Not transformers' "constant_with_warmup": that schedule is lr * step / warmup
      from step 0, so TRL's first optimizer step would take lr = 0 and every warmup step a fifth less than ours
      ((step + 1) / warmup); the same scheduler removes the offset.
    - Prompts: train.py's (`train.load_split`: `build_prompt` with the "short" template, ChatML already applied),
      decoded to text with our tokenizer; TRL gets plain strings (no chat template re-applied: a string prompt is not
      "conversational") and tokenises them with PreTrainedTokenizerFast from the checkpoint's tokenizer.json; the ids
      are checked equal to ours for every train prompt (a mismatch stops the run). Padding side left.
    - Stop tokens and mask: generation_config.eos_token_id = our tokenizer's stop ids, pad = our pad id; TRL masks every
      token after the first stop (the stop itself kept), as our completion mask does. The reward function decodes TRL's
      `completion_ids` with our `sql_env.model_text`, so both score exactly the same text, through our `score_batch`
      with a `Sandbox` of the same size.
    - Vocabulary: the toy checkpoint has 2,048 embedding rows for 2,007 tokens. Our sampler never samples the padded
      rows; TRL samples from all rows, so the padded ids are passed as `suppress_tokens` (-inf logits). The training
      log-softmax still runs over all 2,048 rows in TRL (41 rows the SFT pushed to ~0 probability).
    - Data: the RL-filtered train examples of train.py (`train.rl_data`), and the same prompts per step as
      ours: the dataset given to TRL is our `step_indices` order for steps 0..K-1 with shuffle_dataset=False (a paired
      comparison; the rollouts differ only by the sampler's random numbers).
    - Checked at start-up, per seed: transformers' Qwen2ForCausalLM on our SFT checkpoint gives our model's logits (max
      |diff| printed; fails above 1e-3).
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    B, G = cfg.prompts_per_step, cfg.group_size
    order = [i for s in range(steps) for i in sqlr1_train.step_indices(len(examples), B, s, seed)]
    texts = [tokenizer.decode(prompts[i].ids) for i in order]
    hf_tok = PreTrainedTokenizerFast.from_pretrained(sft)
    hf_tok.pad_token_id, hf_tok.padding_side = tokenizer.pad_id, "left"
    for i, text in zip(order, texts):
        if hf_tok(text)["input_ids"] != prompts[i].ids:
            raise SystemExit(f"error: transformers tokenises prompt {i} differently from ours; fix {sft}/tokenizer.json")
    data = Dataset.from_list([{"prompt": t, "db_path": str(examples[i].db_path), "gold": examples[i].sql}
                              for i, t in zip(order, texts)])

    timer = {"reward": [], "gen_score": [], "step": []}

    def sql_reward(completions, completion_ids, db_path, gold, **_):
        t0 = time.perf_counter()
        texts = [model_text(tokenizer, ids) for ids in completion_ids]
        r = score_batch(sandbox, texts, list(zip(db_path, gold)), cfg.reward,
                        count_tokens=lambda s: len(tokenizer.encode(s)))
        timer["reward"].append(time.perf_counter() - t0)
        k = len(timer["reward"]) - 1  # this step's prompts must be ours (paired comparison)
        if sorted(set(gold)) != sorted({examples[i].sql for i in order[k * B : (k + 1) * B]}):
            raise SystemExit(f"error: TRL's step {k + 1} drew other prompts than ours; is shuffle_dataset off?")
        return [x.total for x in r]

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            result = super()._generate_and_score_completions(inputs)
            timer["gen_score"].append(time.perf_counter() - t0)
            return result

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            timer["step"].append(now - self.t)
            self.t = now

    rewards = []

    class RewardLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                rewards.append(logs["reward"])

    model = AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32)
    model.generation_config.eos_token_id = list(tokenizer.eos_ids)
    model.generation_config.pad_token_id = tokenizer.pad_id
    padded = list(range(tokenizer.vocab_size, model.config.vocab_size))
    opt = new_optimizer(model, replace(cfg, grpo_steps=steps), "grpo")
    load0 = os.getloadavg()[0]
    args = GRPOConfig(
        output_dir=str(out / f"trl_s{seed}"), max_steps=steps, per_device_train_batch_size=16,
        gradient_accumulation_steps=B * G // 16, num_generations=G, num_iterations=1, loss_type="dapo",
        scale_rewards="group", beta=0.0, epsilon=0.2, temperature=cfg.temperature, top_p=cfg.top_p,
        top_k=cfg.top_k, max_completion_length=cfg.max_response_len, max_grad_norm=cfg.grad_clip,
        learning_rate=cfg.lr, bf16=False, use_cpu=True, use_vllm=False, seed=seed, shuffle_dataset=False,
        generation_kwargs={"suppress_tokens": padded} if padded else None, logging_steps=1, save_strategy="no",
        report_to=[], disable_tqdm=True, dataloader_num_workers=0, log_completions=False,
    )
    trainer = TimedGRPOTrainer(model=model, reward_funcs=sql_reward, args=args, train_dataset=data,
                               processing_class=hf_tok, optimizers=(opt.adamw, opt.schedule),
                               callbacks=[StepClock(), RewardLog()])
    stops, pad = sorted(trainer.eos_token_ids), trainer.generation_config.pad_token_id
    if stops != sorted(tokenizer.eos_ids) or pad != tokenizer.pad_id:
        raise SystemExit(f"error: TRL stops on {stops} (pad {pad}), "
                         f"ours on {tokenizer.eos_ids} (pad {tokenizer.pad_id}); check {sft}/generation_config.json")
    trainer.train()
    saved = out / f"trl_s{seed}" / "final"
    trainer.model.save_pretrained(saved)
    hf_tok.save_pretrained(saved)
    n = len(timer["step"])
    gs = timer["gen_score"][:n]
    return {"model": saved, "reward": rewards[:n], "load": (load0, os.getloadavg()[0]), "rollout": [g - r for g, r in zip(gs, timer["reward"])],
            "reward_time": timer["reward"][:n], "update": [s - g for s, g in zip(timer["step"], gs)]}


def held_out_ex(model_dir: Path, cfg, tokenizer, eval_examples, eval_prompts, sandbox: Sandbox) -> float:
    """(c): greedy EX on the held-out set with our loader and our evaluator, in train.py's environment."""
    model = load_model(model_dir, dtype=torch.float32)
    env = SqlEnv(sandbox, tokenizer, cfg.max_turns, cfg.obs_rows, cfg.obs_max_tokens, cfg.reward.timeout)
    return evaluate_policy(env, model, eval_examples, eval_prompts, replace(cfg, eval_n=1), vote=False)["ex_greedy"]


def per_step(x: dict, skip_first: bool) -> dict:
    """Mean seconds per step of each phase, and the median step (optionally without step 1: start-up costs).
    The median is what to compare on a machine other jobs load unevenly (one slowed step moves the mean).

    Timing. Ours: metrics.jsonl's time_rollout / time_reward / time_train per GRPO step. TRL: a GRPOTrainer subclass
    times `_generate_and_score_completions` (generation + reward + advantages), the reward function is wrapped with a
    timer, and a TrainerCallback takes the wall time between consecutive `on_step_end`s (first: from `on_train_begin`):
    rollout = generate_and_score - reward, update = step - generate_and_score (forward/backward of the 4 micro-batches,
    clip, AdamW, TRL's logging). The two sides run one after the other: on a machine other jobs load unevenly, the
    ratio of the medians is the fairer one, and the 1-minute load average before and after each side is printed
    (a run where the two differ is not a fair ratio: measure it on a quiet machine).
    Both sides are deterministic given the seed (two runs gave the same per-step rewards on each side).
    """
    k = 1 if skip_first and len(x["rollout"]) > 1 else 0
    parts = {p: sum(x[p][k:]) / len(x[p][k:]) for p in ("rollout", "reward_time", "update")}
    totals = sorted(a + b + c for a, b, c in zip(x["rollout"][k:], x["reward_time"][k:], x["update"][k:]))
    n = len(totals)
    median = (totals[(n - 1) // 2] + totals[n // 2]) / 2
    return {**parts, "total": sum(parts.values()), "median": median}


def report(results: dict, seeds: list[int], steps: int, threads: int, cpu: str, wall: float) -> str:
    lines = [f"TRL referee: {len(seeds)} seed(s), {steps} GRPO steps each (8 prompts x 8), {cpu}, {threads} thread(s), "
             f"total wall {wall / 60:.1f} min", "",
             "| seed | EX greedy SFT | EX greedy ours | EX greedy TRL | ours - TRL |", "|---|---|---|---|---|"]
    for s in seeds:
        r = results[s]
        lines.append(f"| {s} | {r['ex_sft']:.3f} | {r['ex_ours']:.3f} | {r['ex_trl']:.3f} | "
                     f"{r['ex_ours'] - r['ex_trl']:+.3f} |")
    cells = [pm([results[s][key] for s in seeds]) for key in ("ex_sft", "ex_ours", "ex_trl")]
    cells.append(pm([results[s]["ex_ours"] - results[s]["ex_trl"] for s in seeds], sign="+"))
    lines += ["| mean ± 95% CI | " + " | ".join(cells[:3]) + f" | {cells[3]} (paired) |", "",
              "Mean training reward per GRPO step (ours / TRL):", "",
              "| step | " + " | ".join(f"seed {s} ours | seed {s} TRL" for s in seeds) + " |",
              "|---|" + "---|---|" * len(seeds)]
    for k in range(steps):
        cells = []
        for s in seeds:
            for side in ("ours", "trl"):
                rw = results[s][side]["reward"]
                cells.append(f"{rw[k]:.3f}" if k < len(rw) else "")
        lines.append(f"| {k + 1} | " + " | ".join(cells) + " |")
    lines += ["", "Seconds per GRPO step (mean over seeds; steps 2..K, step 1 holds start-up costs):", "",
              "| side | rollout | reward | update | total | median step | load avg before -> after |",
              "|---|---|---|---|---|---|---|"]
    tot, med = {}, {}
    for side, name in (("ours", "ours (sqlr1)"), ("trl", "TRL GRPOTrainer")):
        ps = [per_step(results[s][side], skip_first=True) for s in seeds]
        avg = {p: sum(x[p] for x in ps) / len(ps) for p in ps[0]}
        tot[side], med[side] = avg["total"], avg["median"]
        lines.append(f"| {name} | {avg['rollout']:.2f} | {avg['reward_time']:.3f} | {avg['update']:.2f} | "
                     f"{avg['total']:.2f} | {avg['median']:.2f} | "
                     + ", ".join(f"{results[s][side]['load'][0]:.1f} -> {results[s][side]['load'][1]:.1f}" for s in seeds)
                     + " |")
    lines += ["", f"ratio TRL s/step / ours s/step: {tot['trl'] / tot['ours']:.2f}x on the means, "
              f"{med['trl'] / med['ours']:.2f}x on the medians (goal >= 3x)", ""]
    return "\n".join(lines)


def plot(results: dict, seeds: list[int], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in seeds:
        for side, style in (("ours", "-"), ("trl", "--")):
            rw = results[s][side]["reward"]
            ax.plot(range(1, len(rw) + 1), rw, style, label=f"{'ours' if side == 'ours' else 'TRL'} seed {s}")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean training reward")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=100,
                    help="K GRPO steps per side and seed (100: the demo's and the lab's GRPO stage)")
    ap.add_argument("--sft", nargs="*", default=[], help="one SFT checkpoint (a final/ directory) per seed")
    ap.add_argument("--make_sft", action="store_true",
                    help="take the SFT checkpoints from the lab's cache (sqlr1.lab.sft_checkpoint; run when missing)")
    ap.add_argument("--sft_steps", type=int, default=None, help="--make_sft: cold-start steps (default: the config's)")
    ap.add_argument("--cache_dir", default="runs/lab_cache", help="--make_sft: the lab's SFT cache")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work_dir", default="runs/bench_trl", help="run directories and logs")
    ap.add_argument("--out", default="", help="write the tables to this markdown file")
    a = ap.parse_args(argv)
    os.chdir(ROOT)  # the lab's relative paths (configs/, toyworld, runs/lab_cache): its SFT cache keys match
    if a.make_sft == bool(a.sft):
        raise SystemExit("error: give either --sft DIR per seed or --make_sft")
    if a.sft and len(a.sft) != len(a.seeds):
        raise SystemExit(f"error: --sft has {len(a.sft)} directories for {len(a.seeds)} --seeds; give one per seed")
    if a.steps < 1:
        raise SystemExit("error: --steps must be >= 1")
    try:
        import trl
    except ImportError:
        raise SystemExit('error: TRL is not installed; pip install -e ".[bench]"') from None

    torch.set_num_threads(a.threads)
    cpu = cpu_model()
    print(f"CPU: {cpu}; threads: {a.threads} (torch {torch.__version__}, trl {trl.__version__})")
    out = (ROOT / a.work_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = toyworld.resolve_config(load_config(CONFIG, [f"--data_root={ROOT / 'toyworld'}"]))
    toyworld.prepare(cfg)
    t_start = time.time()
    results = {}
    with Sandbox(num_workers=cfg.sandbox_workers, timeout=cfg.reward.timeout) as sandbox:
        for k, seed in enumerate(a.seeds):
            sft = Path(a.sft[k]).resolve() if a.sft else make_sft(seed, a.sft_steps, a.cache_dir)
            cfg_s = replace(cfg, seed=seed, model=str(sft))
            tokenizer = load_tokenizer(sft)
            examples, prompts = rl_data(cfg_s, tokenizer, sandbox)
            held_out = sqlr1_train.load_split(cfg, tokenizer, cfg.eval_split)
            eval_examples, eval_prompts = held_out.examples, held_out.prompts
            diff = check_hf_logits(sft, prompts[0].ids)
            print(f"seed {seed}: SFT {sft}; {len(examples)} RL train examples; transformers vs ours logits "
                  f"max |diff| {diff:.1e}")
            ours = run_ours(sft, seed, a.steps, out, a.threads)
            print(f"seed {seed}: ours done ({ours['wall']:.0f} s)")
            theirs = run_trl(sft, seed, a.steps, out, cfg_s, examples, prompts, tokenizer, sandbox)
            print(f"seed {seed}: TRL done")
            results[seed] = {
                "ours": ours, "trl": theirs,
                "ex_sft": held_out_ex(sft, cfg_s, tokenizer, eval_examples, eval_prompts, sandbox),
                "ex_ours": held_out_ex(ours["model"], cfg_s, tokenizer, eval_examples, eval_prompts, sandbox),
                "ex_trl": held_out_ex(theirs["model"], cfg_s, tokenizer, eval_examples, eval_prompts, sandbox),
            }
            print(f"seed {seed}: held-out EX greedy SFT {results[seed]['ex_sft']:.3f} ours "
                  f"{results[seed]['ex_ours']:.3f} TRL {results[seed]['ex_trl']:.3f}")
            if a.out:  # written as it goes: the seeds done so far
                Path(a.out).write_text(report(results, list(results), a.steps, a.threads, cpu, time.time() - t_start))
    text = report(results, a.seeds, a.steps, a.threads, cpu, time.time() - t_start)
    print(text)
    if a.out:
        Path(a.out).write_text(text)
        png = plot(results, a.seeds, Path(a.out).with_suffix(".png"))
        print(f"wrote {a.out}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
