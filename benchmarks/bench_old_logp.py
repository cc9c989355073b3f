"""What recomputing log pi_old costs: the trainer's no-grad forward vs the policy update it precedes.

    python benchmarks/bench_old_logp.py                 # tiny CPU shape (as bench_train.py)
    python benchmarks/bench_old_logp.py --device cuda   # Qwen2.5-1.5B shape, bf16 autocast

Same model, same micro-batch, same run: the no-grad forward of `sqlr1.update.logprobs` that `policy_update` runs for
pi_old once per GRPO step with recompute_old_logp=True and ppo_epochs > 1 (at ppo_epochs = 1 pi_old is the update's
own forward, detached) against one update (`accumulate_gradients` + `optimizer_step`), with and without gradient
checkpointing (the 7B recipe checkpoints). Prints seconds per call and the ratio forward / update, i.e. the fraction
a separate pi_old forward adds to one pass's time.
"""

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_train import SHAPES, batch, timed  # noqa: E402
from sqlr1.config import TrainConfig  # noqa: E402
from sqlr1.distributed import Dist, Models  # noqa: E402
from sqlr1.grpo import GRPOConfig, loss_norm  # noqa: E402
from sqlr1.model import ModelConfig, Qwen2  # noqa: E402
from sqlr1.update import (  # noqa: E402
    accumulate_gradients, grpo_objective, new_optimizer, old_logprobs, optimizer_step,
)


def measure(mcfg: ModelConfig, mb, device, dtype, checkpointing: bool, steps: int) -> tuple[float, float]:
    """Seconds per call of (the pi_old forward, one update) on the same model and micro-batch."""
    torch.manual_seed(0)
    model = Qwen2(mcfg).to(device)
    model.gradient_checkpointing = checkpointing
    tcfg = TrainConfig(lr=1e-5, grpo=GRPOConfig(kl_coef=0.0))
    opt = new_optimizer(model, tcfg, "grpo")
    ctx = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    models = Models(policy=model, ref=None, rollout=model, autocast=ctx)
    objective = grpo_objective(tcfg, loss_norm([mb.mask], 2048), {})

    def update():
        loss, _ = accumulate_gradients(models, [mb], objective, tcfg.temperature, True, mcfg.vocab_size, tcfg,
                                       Dist(device=device))
        optimizer_step(model, opt, tcfg, loss)

    forward = timed(lambda: old_logprobs(models, [mb], tcfg, mcfg.vocab_size, {}), steps, device)
    return forward, timed(update, steps, device)


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
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, shape {shape}, {rows} rows x "
          f"({prompt} prompt + {completion} completion) tokens, {dtype}")
    print(f"{'gradient checkpointing':<24}{'forward s':>10}{'update s':>10}{'forward / update':>18}")
    for checkpointing in (False, True):
        forward, step = measure(mcfg, mb, device, dtype, checkpointing, args.steps)
        print(f"{checkpointing!s:<24}{forward:>10.3f}{step:>10.3f}{forward / step:>17.2f}x")


if __name__ == "__main__":
    main()
