"""Run under torchrun (see test_dryrun.py): save_checkpoint of an FSDP-sharded tiny model on 2 gloo ranks.

Writes {rank: peak bytes above what was alive before the save} and the full fp32 model's bytes to argv[2] (JSON),
and the checkpoint into the run directory argv[1].
"""

import json
import os
import sys
from pathlib import Path

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from sqlr1 import distributed
from sqlr1.run import save_checkpoint
from tests.dryrun_case import checkpoint_model


def main(run_dir: str, out: str) -> None:
    d = distributed.setup("cpu")
    model = checkpoint_model()
    full_bytes = sum(p.numel() * 4 for p in model.parameters())
    distributed.shard(model, torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    for p in model.parameters():  # AdamW's state exists, as after any training step
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    mt = MemTracker()
    mt.track_external(model, opt)
    before = next(iter(mt.get_tracker_snapshot().values()))["Total"]
    with mt:
        save_checkpoint(Path(run_dir), 1, model, opt, {"step": 1}, None, d, torch.bfloat16)
    peak = next(iter(mt.get_tracker_snapshot("peak").values()))["Total"] - before
    peaks = distributed.all_gather_objects(peak)
    if d.is_main:
        Path(out).write_text(json.dumps({"peaks": peaks, "full_bytes": full_bytes}))
    distributed.cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    os._exit(0)  # gloo's threads can abort in static destructors at interpreter exit (see dist_split.py)
