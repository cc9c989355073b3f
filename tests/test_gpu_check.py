"""benchmarks/gpu_check.py at tiny shapes on the CPU (so that the GPU check cannot rot between GPU runs), and its
verdict rules."""

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


def _check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def table_rows(table: str) -> list[list[str]]:
    """The body rows of the markdown table, as cells: part, what, measured, reference, ratio, verdict."""
    lines = [line for line in table.splitlines() if line.startswith("| (")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]


def numbers(cell: str) -> list[float]:
    return [float(x.replace(",", "")) for x in re.findall(r"-?\d[\d,]*\.?\d*(?:e-?\d+)?", cell)]


def test_tiny_run_reports_every_part_with_finite_numbers(tmp_path):
    out = tmp_path / "check.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = out.read_text()
    assert proc.stdout.strip() == table.strip()  # stdout is the table alone
    assert not re.search(r"\bnan\b|\binf\b", table, re.IGNORECASE), table
    rows = table_rows(table)
    assert rows and all(len(r) == 6 for r in rows), table
    assert "FAILED" not in {r[5] for r in rows}, table
    by_part = {p: [r for r in rows if r[0] == f"({p})"] for p in "abcd"}
    for part, part_rows in by_part.items():  # every part has rows, each with a measured number
        assert any(numbers(r[2]) for r in part_rows), f"part ({part}) has no measured number:\n{table}"
    # (a) two models x (prefill, decode step), bf16 within the rule: the CPU's bf16 is the "device"
    assert len(by_part["a"]) == 4 and all(r[5] == "ok" for r in by_part["a"]), table
    # (b) the bandwidth, batch 1, 8 and 64 eager, the compile, batch 8 and 64 compiled; tokens/s > 0
    decode = [r for r in by_part["b"] if r[1].startswith("decode tok/s")]
    assert [("compiled" in r[1], numbers(r[1])[-1]) for r in decode] == [
        (False, 1), (False, 8), (False, 64), (True, 8), (True, 64)], table
    assert all(numbers(r[2])[0] > 0 and float(r[4]) > 0 for r in decode), table
    # (c) every GRPO step ran, each of train.py's update phases has the dry run's prediction; (d) both evaluations
    steps, evals = by_part["c"][0], by_part["d"][0]
    assert steps[5] == "ok" and steps[2].startswith("2 ") and evals[5] == "ok" and evals[2].startswith("2 "), table
    predicted = {re.search(r"phase '(.+?)'", r[1]).group(1): numbers(r[3]) for r in rows if "peak memory" in r[1]}
    assert set(predicted) == {"rollout", "train", "reference", "update", "optimizer", "eval"}, table
    assert all(len(v) == 1 and v[0] > 0 for v in predicted.values()), table


def test_memory_verdicts():
    """The dry run must not under-predict a phase; a prediction far above the measure is loose; no CUDA: no verdict."""
    check = _check()
    predicted = {"reference": {"total": 8 * GiB}, "update": {"total": 10 * GiB}, "optimizer": {"total": 12 * GiB},
                 "eval greedy": {"total": 6 * GiB}, "eval voted": {"total": 7 * GiB}}
    train = check.memory_row("c", "train", 11.5, predicted)  # the train phase spans the update's phases: their max
    assert (train.verdict, train.reference, round(train.ratio, 3)) == ("ok", "12.00 GiB", round(11.5 / 12, 3))
    assert check.memory_row("c", "update", 10.6, predicted).verdict == "check: over the prediction"
    assert check.memory_row("d", "eval", 3.0, predicted).verdict == "loose"
    assert check.memory_row("d", "eval", math.nan, predicted).verdict != "ok"
    assert check.memory_row("c", "update", None, predicted).verdict == "n/a (no CUDA)"
    assert check.memory_row("c", "update", 20.0, predicted, judge=False).verdict == "info (tiny)"
    assert check.memory_row("c", "reward", 9.0, predicted).verdict == "info"  # host side: nothing predicted


def test_peaks_are_read_under_the_keys_train_py_logs(monkeypatch):
    """run.Phases names the logged keys; the check reads them (phase names with spaces included)."""
    from sqlr1.run import Phases

    allocated = iter([3 * GiB, 5 * GiB])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: next(allocated))
    phases = Phases(torch.device("cuda"))
    for name in ("old logp", "update"):
        with phases(name):
            pass
    records = [phases.peaks(), {"peak_mem_update_gib": 4.0}]
    check = _check()
    assert check.peak(records, "old logp") == 3.0 and check.peak(records, "update") == 5.0
    assert check.peak(records, "rollout") is None
