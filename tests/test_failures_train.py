"""train.py's failure paths: resume checks, the run-directory lock, keep_last, final/, Ctrl-C, start-up checks.

Real processes throughout: a tiny SFT run on a small toy world is trained once per module (train.py in a
subprocess) and copied for each test that continues it; Ctrl-C is a real SIGINT to the process group.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sample
import train
from sqlr1.checkpoint import save_model
from sqlr1.distributed import resolve_device
from sqlr1.model import ModelConfig, Qwen2
from sqlr1.run import lock_run_dir, promote_final, prune_checkpoints
from sqlr1.tokenizer import load_tokenizer
from sqlr1.toyworld import build_toyworld

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def args(world: Path, out: Path, *extra: str) -> list[str]:
    """A 2-step SFT run on the small world: checkpoints after each step, no evaluation, no GRPO."""
    return ["--config", str(ROOT / "configs" / "grpo_tiny.py"), f"--data_root={world}", f"--out_dir={out}",
            "--sft_steps=2", "--grpo_steps=0", "--save_every=1", "--eval_split=", "--sft_batch_size=2",
            "--sandbox_workers=1", *extra]


def run_train(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return build_toyworld(tmp_path_factory.mktemp("toy") / "world", seed=0, num_train_dbs=6, num_dev_dbs=2)


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "done"
    result = run_train(args(world, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture
def run(finished, tmp_path) -> Path:
    """A private copy of the finished run."""
    return Path(shutil.copytree(finished, tmp_path / "run", symlinks=True))


def test_resume_refuses_conflicts_records_allowed_changes_prunes_and_keeps_users_files(world, run):
    saved = (run / "config.json").read_text()
    with pytest.raises(ValueError, match=r"sft_lr=0\.001 differs from the run's sft_lr=0\.004 in .*config\.json"):
        train.main(args(world, run, "--sft_lr=1e-3", "--resume"))
    assert (run / "config.json").read_text() == saved and not (run / "config_changes.jsonl").exists()

    (run / "final" / "eval_spider_dev").mkdir()
    (run / "final" / "eval_spider_dev" / "pred_dev.txt").write_text("SELECT 1\n")  # what sample.py writes there
    (run / "checkpoints" / "step_000003.tmp").mkdir()  # a save that a SIGKILL interrupted
    result = run_train(args(world, run, "--sft_steps=4", "--keep_last=1", "--resume"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resume: changed sft_steps 2 -> 4, keep_last 0 -> 1" in result.stdout
    changes = [json.loads(line) for line in (run / "config_changes.jsonl").read_text().splitlines()]
    assert [(c["step"], c["changes"]) for c in changes] == [(2, {"sft_steps": [2, 4], "keep_last": [0, 1]})]
    assert json.loads((run / "config.json").read_text())["sft_steps"] == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000004"]
    assert (run / "final" / "eval_spider_dev" / "pred_dev.txt").read_text() == "SELECT 1\n"
    model_file = run / "checkpoints" / "step_000004" / "model" / "model.safetensors"
    assert (run / "final" / "model.safetensors").stat().st_ino == model_file.stat().st_ino  # the new model


def test_failed_resume_names_what_was_given_and_creates_nothing(world, run, tmp_path):
    new = tmp_path / "new"
    with pytest.raises(FileNotFoundError, match=r"--resume=/no/such/dir: no such checkpoint directory"):
        train.main(args(world, new, "--resume=/no/such/dir"))
    with pytest.raises(FileNotFoundError, match=rf"--out_dir={new} does not exist, so there is no run to continue"):
        train.main(args(world, new, "--resume"))
    assert not new.exists()
    with pytest.raises(FileNotFoundError, match=r"final is a model \(HF layout, like a run's final/\), not a training"):
        train.main(args(world, new, f"--resume={run / 'final'}"))
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(FileNotFoundError, match=rf"{run / 'checkpoints'} holds no complete checkpoint"):
        train.main(args(world, run, "--resume"))
    assert not new.exists()


def test_toy_run_with_a_named_model_that_does_not_exist_is_refused(world, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--model=.*missing: checkpoint directory .*missing does not exist; leave model empty"):
        train.main(args(world, tmp_path / "out", f"--model={tmp_path / 'missing'}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no model trained from scratch there, no run directory


def test_second_process_on_a_run_directory_is_refused_with_the_holders_pid(world, run):
    code = ("import sys, time; from pathlib import Path; from sqlr1.run import lock_run_dir; "
            f"f = lock_run_dir(Path({str(run)!r})); print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(ValueError, match=rf"{run} is in use by another training process \(PID {holder.pid}"):
            train.main(args(world, run, "--sft_steps=3", "--resume"))
        assert json.loads((run / "config.json").read_text())["sft_steps"] == 2
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock, nothing stale stays behind
        holder.wait()
    lock = lock_run_dir(run)
    assert (run / "train.lock").read_text() == f"{os.getpid()}\n"
    lock.close()


def tiny_model_dir(path: Path, vocab_rows: int, tokenizer) -> Path:
    config = ModelConfig(vocab_size=vocab_rows, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=True)
    model = Qwen2(config)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    return save_model(model, path, tokenizer=tokenizer)


def test_tokenizer_larger_than_the_embedding_is_refused_at_start_up(world, tmp_path):
    tokenizer = load_tokenizer(world / "tokenizer")
    model = tiny_model_dir(tmp_path / "small_vocab", 64, tokenizer)
    message = rf"{model}: tokenizer.json has {tokenizer.vocab_size} token ids but the model's embedding has only 64"
    with pytest.raises(ValueError, match=message):
        train.main(args(world, tmp_path / "out", f"--model={model}"))
    assert not (tmp_path / "out" / "checkpoints").exists()
    db = next((world / "database").glob("*/*.sqlite"))
    with pytest.raises(ValueError, match=message):
        sample.main(["--model", str(model), "--db", str(db), "--question", "How many rows?", "--n", "1",
                     "--device", "cpu"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_cuda_device_without_a_gpu_is_one_sentence(world, tmp_path):
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match=rf"--device={name}: no CUDA GPU is available on this machine"):
            resolve_device(name)
    with pytest.raises(ValueError, match="--device=gpu: not a device name"):
        resolve_device("gpu")
    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        train.main(args(world, tmp_path / "out", "--device=cuda"))
    db = next((world / "database").glob("*/*.sqlite"))
    with pytest.raises(ValueError, match="no CUDA GPU"):
        sample.main(["--model", str(tmp_path), "--db", str(db), "--question", "How many?", "--device", "cuda"])
    assert not (tmp_path / "out").exists()


def test_ctrl_c_prints_one_line_with_the_command_that_continues(world, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", *args(world, out, "--sft_steps=500")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "latest").exists():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]  # the last word, after the progress bar's
    assert line.startswith("interrupted after step ") and " of 500 (the last checkpoint is step_0000" in line
    assert not list((out / "checkpoints").glob("*.tmp"))
    command = shlex.split(line.split("continue with: ")[1])
    assert command[:2] == ["python", "train.py"] and command[-2:] == [f"--out_dir={out}", "--resume"]
    step = int((out / "checkpoints" / "latest").read_text().removeprefix("step_"))
    again = run_train([*command[2:], f"--sft_steps={step}"])  # the printed command (ending at the checkpoint)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "final" / "config.json").is_file()


def test_keep_last_keeps_the_newest_and_the_one_latest_names(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        (ckpts / f"step_{step:06d}").mkdir(parents=True)
    (ckpts / "latest").write_text("step_000002")  # resumed from an older checkpoint
    assert prune_checkpoints(tmp_path, 0) == []
    assert prune_checkpoints(tmp_path, 1) == [ckpts / "step_000001", ckpts / "step_000003"]
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000002", "step_000004"]


def test_promote_final_replaces_only_model_files(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (model / name).write_text(f"new {name}")
    final = tmp_path / "final"
    (final / "eval_spider_dev").mkdir(parents=True)
    (final / "eval_spider_dev" / "pred_dev.txt").write_text("mine")
    (final / "notes.txt").write_text("mine")
    (final / "adapter.safetensors").write_text("mine")  # not a name the export writes
    for name in ("config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json"):
        (final / name).write_text(f"old {name}")
    promote_final(model, final)
    assert sorted(p.name for p in final.iterdir()) == [
        "adapter.safetensors", "config.json", "eval_spider_dev", "model.safetensors", "notes.txt", "tokenizer.json"]
    assert (final / "config.json").read_text() == "new config.json"
    assert (final / "model.safetensors").stat().st_ino == (model / "model.safetensors").stat().st_ino
    assert (final / "eval_spider_dev" / "pred_dev.txt").read_text() == (final / "notes.txt").read_text() == "mine"


def test_ctrl_c_during_a_checkpoint_save_removes_the_unfinished_checkpoint(world, tmp_path, monkeypatch, capsys):
    from sqlr1 import run as run_module

    real_save = run_module.save_checkpoint

    def save_then_ctrl_c_in_the_second(run_dir, step, *rest, **kw):
        if step == 1:
            return real_save(run_dir, step, *rest, **kw)
        (run_dir / "checkpoints" / f"step_{step:06d}.tmp" / "state").mkdir(parents=True)  # half written
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "save_checkpoint", save_then_ctrl_c_in_the_second)
    out = tmp_path / "run"
    assert train.main(args(world, out)) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("interrupted after step 2 of 2 (the last checkpoint is step_000001; the unfinished "
                           "step_000002.tmp was removed); continue with: python ")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_000001"]


def test_one_rank_failing_ends_every_rank_at_once(world, tmp_path):
    """2 ranks (torchrun, gloo): rank 1 raises in GRPO step 1 while rank 0 waits in that step's collectives. The job
    ends non-zero within seconds, not at the process-group timeout (30 min), and rank 1's error is printed once."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "fail_worker.py"), *args(world, tmp_path / "run", "--sft_steps=0", "--grpo_steps=2",
                                                          "--prompts_per_step=2", "--group_size=2")]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env={**ENV, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=600)
    elapsed = time.time() - t0
    assert proc.returncode != 0
    assert proc.stderr.count("RuntimeError: rank 1 cannot go on") == 1, proc.stderr[-3000:]
    assert "[rank 0] Traceback" not in proc.stderr, proc.stderr[-3000:]  # rank 0: one line (gloo's error or SIGTERM)
    assert elapsed < 60, (elapsed, proc.stderr[-3000:])


@pytest.mark.parametrize("visible, local_rank, expected", [(1, 3, 0), (8, 3, 3), (2, 5, None)])
def test_each_rank_finds_its_gpu(monkeypatch, visible, local_rank, expected):
    """Local rank r uses cuda:r where every process sees the node's GPUs, cuda:0 where each process sees one
    (CUDA_VISIBLE_DEVICES per rank); a rank with no GPU of its own is one error line."""
    from sqlr1 import distributed

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    if expected is None:
        with pytest.raises(ValueError, match="local rank 5 has no GPU"):
            distributed.setup("cuda")
    else:
        assert distributed.setup("cuda").device == chosen[0] == torch.device("cuda", expected)


def files_of(run: Path) -> dict[str, bytes]:
    """Every file of a run directory (but the lock) and its bytes."""
    return {str(f.relative_to(run)): f.read_bytes() for f in sorted(run.rglob("*")) if f.is_file() and f.name != "train.lock"}


@pytest.mark.parametrize("damage", ["checkpoints deleted", "latest dangling"])
def test_a_fresh_run_never_overwrites_a_finished_one(world, run, damage):
    """A run directory holding a run's files is reused only by --resume, however its checkpoints look."""
    if damage == "checkpoints deleted":
        shutil.rmtree(run / "checkpoints")
    else:
        shutil.rmtree(run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip())
    before = files_of(run)
    with pytest.raises(ValueError, match=rf"{run} already holds a training run \(config.json, metrics.jsonl.*final"):
        train.main(args(world, run))
    assert files_of(run) == before


def test_resume_continues_from_the_newest_intact_checkpoint(world, run):
    """`latest` names a checkpoint that is gone: resume says so and continues from the newest complete one."""
    shutil.rmtree(run / "checkpoints" / "step_000002")
    result = run_train(args(world, run, "--resume"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "continuing from step_000001, the newest complete one" in result.stderr
    assert (run / "checkpoints" / "latest").read_text() == "step_000002"  # step 2 trained again


@pytest.mark.parametrize("damage", ["no shard", "truncated shard", "no metadata", "truncated rng"])
def test_a_damaged_checkpoint_is_one_line_and_the_run_record_is_untouched(world, run, damage):
    """Resuming from a damaged checkpoint names it and the intact one before it, and writes nothing: not
    config.json (its changed setting), not config_changes.jsonl, not the logs."""
    ckpt = run / "checkpoints" / "step_000002"
    shard = next((ckpt / "state").glob("*.distcp"))
    if damage == "no shard":
        shard.unlink()
    elif damage == "truncated shard":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "no metadata":
        (ckpt / "state" / ".metadata").unlink()
    else:
        rng = ckpt / "rng_rank0.pt"
        rng.write_bytes(rng.read_bytes()[:100])
    before = files_of(run)
    with pytest.raises(ValueError, match=rf"checkpoint {ckpt} is damaged: .*resume from the one before it: "
                                         rf"--resume={run / 'checkpoints' / 'step_000001'}"):
        train.main(args(world, run, "--sft_steps=3", "--resume"))
    assert files_of(run) == before


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(world, tmp_path, monkeypatch):
    """The second save fails writing (ENOSPC, injected into torch.save): one line saying which save failed and which
    checkpoint is kept; the partial step_000002.tmp is gone."""
    import errno

    real_save = torch.save

    def full_disk(obj, path, *a, **kw):
        if "step_000002" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"saving checkpoint step_000002 in .* failed: No space left on device \(the "
                                         r"partial save was removed; step_000001 is kept\); free disk space, then "
                                         r"continue with --resume"):
        train.main(args(world, out))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_000001"]


def test_sigterm_says_where_the_run_stopped_and_how_to_continue(world, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", *args(world, out, "--sft_steps=500")], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "latest").exists():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # what a scheduler or `kill` sends: to the process alone
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("stopped by SIGTERM after step ") and "continue with: python train.py" in line, line


def test_nothing_to_train_and_a_bad_dry_run_are_refused_before_anything_is_built(world, tmp_path):
    with pytest.raises(ValueError, match="sft_steps=0 and grpo_steps=0: nothing to train"):
        train.main(args(world, tmp_path / "out", "--sft_steps=0", "--grpo_steps=0"))
    assert not (tmp_path / "out").exists()
    new_world = tmp_path / "world"
    proc = run_train(["--config", str(ROOT / "configs" / "grpo_tiny.py"), f"--data_root={new_world}", "--dry_run",
                      "--gpus=0"])
    assert proc.returncode != 0 and "--gpus=0" in proc.stderr and not new_world.exists(), proc.stderr[-2000:]
