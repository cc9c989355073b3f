"""Suite-wide set-up and the fixtures several test files share.

The Ctrl-C tests need SIGINT to act: a suite started with SIGINT ignored (`nohup ... &` from a shell without job
control) would pass the ignored disposition on to every child across exec, and the tests would fail for a reason
that is not in the code. Give the run the default handler back before any test starts."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def torchrun():
    """run(script, *args, nproc=2): tests/<script> under torchrun (gloo, one thread per rank); it must succeed."""
    def run(script: str, *args, nproc: int = 2) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
             str(ROOT / "tests" / script), *map(str, args)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc
    return run


@pytest.fixture
def compiled_graphs(monkeypatch):
    """The FX graphs torch.compile captures from here on (a counting backend that runs each graph eagerly), with the
    sampler's compiled decode step and dynamo's caches reset first."""
    import torch._dynamo

    from sqlr1 import sampling

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": counting_backend}))
    sampling._compiled_decode_step.cache_clear()
    torch._dynamo.reset()
    yield graphs
    sampling._compiled_decode_step.cache_clear()
    torch._dynamo.reset()
