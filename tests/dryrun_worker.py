"""Run under torchrun (see test_dryrun.py): the dry run's phases on REAL tensors over a real 2-rank gloo group.

Writes rank 0's {phase: row} as JSON to the file given as argv[1].
"""

import json
import os
import sys

from torch.distributed.device_mesh import init_device_mesh

from sqlr1 import distributed
from sqlr1.dryrun import simulate
from tests.dryrun_case import CONFIG, MODEL, VOCAB, WORLD, plan


def main(out: str) -> None:
    d = distributed.setup("cpu")
    mesh = init_device_mesh("cpu", (d.world_size,))
    rows = simulate(CONFIG, MODEL, VOCAB, WORLD, plan(), mesh, fake=False)
    if d.is_main:
        with open(out, "w") as f:
            json.dump(rows, f)
    distributed.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
    os._exit(0)  # gloo's threads can abort in static destructors at interpreter exit (see dist_split.py)
