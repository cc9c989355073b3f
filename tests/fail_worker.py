"""Run under torchrun by test_failures_train.py: train.py's main, with the first GRPO step raising on rank 1 only
(an error of one rank, as an out-of-memory in its own rollout would be)."""

import os
import sys

import train

grpo_step = train.grpo_step


def failing_grpo_step(*args, **kwargs):
    if os.environ["RANK"] == "1":
        raise RuntimeError("rank 1 cannot go on")
    return grpo_step(*args, **kwargs)


if __name__ == "__main__":
    train.grpo_step = failing_grpo_step
    sys.exit(train.main(sys.argv[1:]))
