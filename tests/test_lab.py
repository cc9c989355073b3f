"""The RL lab (sqlr1/lab.py) on a micro toy world: 2 variants x 2 seeds, a few SFT and GRPO steps per run.

One lab (a module fixture) is started as a subprocess, interrupted with SIGINT once its first GRPO run is in lab.json
and its next runs are under way, and re-run to completion; while its SFT runs are under way, a second lab on its
folder and a third one sharing its SFT cache (started outside the repository) are started too. The tests then read
its cache, run directories and outputs. Plus the statistics on known numbers and the one-line errors of bad lab
configs.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sqlr1 import lab
from sqlr1.lab import cli, mean_ci, t_quantile_975
from sqlr1.toyworld import build_toyworld

ROOT = Path(__file__).resolve().parents[1]


def test_t_quantile_known_values():
    assert [t_quantile_975(df) for df in (1, 2, 4, 30)] == [12.706, 4.303, 2.776, 2.042]
    assert t_quantile_975(500) == 1.96
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_mean_ci_known_numbers():
    m, h = mean_ci([1.0, 2.0, 3.0])  # s = 1: 4.303 / sqrt(3)
    assert m == 2.0 and h == pytest.approx(2.484, abs=5e-4)
    m, h = mean_ci([0.5, 0.7])  # s = 0.1414: 12.706 * 0.1414 / sqrt(2) = 1.2706
    assert m == pytest.approx(0.6) and h == pytest.approx(1.2706, abs=1e-4)
    assert mean_ci([0.4]) == (0.4, None)  # n = 1: no interval, not a fake one
    assert "no CI" in lab.fmt_ci([0.4])


def micro_overrides(world: Path) -> list[str]:
    return [f"--data_root={world}", "--sft_steps=10", "--sft_batch_size=8", "--grpo_steps=4", "--prompts_per_step=2",
            "--group_size=4", "--eval_limit=6", "--eval_n=2", "--max_response_len=48", "--eval_every=2",
            "--eval_vote=final"]


def write_lab(path: Path, world: Path, out: Path, cache: Path, **fields) -> Path:
    body = dict(
        name="micro", base="configs/grpo_tiny.py", base_overrides=micro_overrides(world),
        seeds=[0, 1], variants={"grpo": [], "arctic": ["--reward.preset=arctic"]},
        out_dir=str(out), cache_dir=str(cache), jobs=2,
    )
    body.update(fields)
    args = ", ".join(f"{k}={v!r}" for k, v in body.items())
    path.write_text(f"from sqlr1.lab import LabConfig\nconfig = LabConfig({args})\n")
    return path


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("lab_*.py")))
def test_shipped_lab_configs_validate(path, monkeypatch):
    """Every lab config in configs/ passes the checks a lab runs before anything starts (rows, overrides, base)."""
    monkeypatch.chdir(ROOT)
    lab.validate(lab.load_lab(path), path)


@pytest.mark.parametrize("fields, message", [
    ({"seeds": []}, "seeds is empty"),
    ({"seeds": [0, 0]}, "duplicates"),
    ({"variants": {}}, "variants is empty"),
    ({"variants": {"dapo": ["--grpo.clip_hihg=0.28"]}}, "variant 'dapo': unknown config key 'grpo.clip_hihg'; did you "
                                                       "mean grpo.clip_high?"),
    ({"variants": {"bad": ["--grpo.loss_agg=sum"]}}, "variant 'bad': GRPOConfig.loss_agg='sum'"),
    ({"variants": {"x": ["--seed=3"]}}, "variant 'x' sets seed"),
    ({"base": "configs/nope.py"}, f"base config configs/nope.py not found in {ROOT}"),
    # names the lab's own runs and rows use
    ({"variants": {"grpo": [], "sft": []}}, "variant name 'sft' is reserved for the lab's SFT runs and rows"),
    ({"variants": {"SFT": []}}, "variant name 'SFT' is reserved"),
    # types: one line naming the field, its value and the expected form
    ({"seeds": ["0", 0]}, "seeds=['0', 0]: expected a list of ints"),
    ({"seeds": ["0", "1"]}, "seeds=['0', '1']: expected a list of ints"),
    ({"seeds": 3}, "seeds=3: expected a list of ints"),
    ({"jobs": "2"}, "jobs='2': expected an int >= 1"),
    ({"variants": ["grpo"]}, "variants=['grpo']: expected a dict {name: list of '--key=value' strings}"),
    ({"variants": {"grpo": None}}, "variants['grpo']=None: expected a list of '--key=value' strings"),
    ({"base_overrides": "--sft_steps=10"}, "base_overrides='--sft_steps=10': expected a list of '--key=value'"),
    ({"cache_dir": ""}, "cache_dir='': expected a folder"),
    # a row without held-out EX, or without the SFT stage its gain is measured from
    ({"variants": {"grpo": [], "no_eval": ["--eval_split="]}}, "variant 'no_eval': eval_split='': the lab compares "
                                                               "held-out EX"),
    ({"variants": {"grpo": [], "no_sft": ["--sft_steps=0"]}}, "variant 'no_sft': sft_steps=0: each row's GRPO stage "
                                                              "starts from its seed's SFT run"),
])
def test_bad_lab_config_is_one_error_line_and_creates_nothing(tmp_path, capsys, monkeypatch, fields, message):
    monkeypatch.chdir(ROOT)
    out, cache = tmp_path / "out", tmp_path / "cache"
    cfg = write_lab(tmp_path / "lab.py", tmp_path / "world", out, cache, **fields)
    assert cli(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists() and not cache.exists() and not (tmp_path / "world").exists()


def test_command_line_overrides_parse_to_the_fields_types(tmp_path):
    cfg = write_lab(tmp_path / "lab.py", tmp_path / "world", tmp_path / "out", tmp_path / "cache")
    labcfg = lab.load_lab(cfg, ["--seeds=0,1", "--jobs=1", "--name=m2"])
    assert (labcfg.seeds, labcfg.jobs, labcfg.name) == ([0, 1], 1, "m2")


def test_a_lab_started_outside_the_repository_finds_its_configs(tmp_path, monkeypatch):
    """--config and base are found from the current folder, then from the repository: the shipped lab and a lab
    config elsewhere with base="configs/grpo_tiny.py" validate, and their runs get a config file that exists."""
    monkeypatch.chdir(tmp_path)
    shipped = lab.validate(lab.load_lab("configs/lab_toy.py"), "configs/lab_toy.py")
    assert Path(shipped.base) == ROOT / "configs/grpo_tiny.py"
    cfg = write_lab(tmp_path / "lab.py", tmp_path / "world", tmp_path / "out", tmp_path / "cache")
    labcfg = lab.validate(lab.load_lab(cfg), str(cfg))
    runs, _ = lab.plan(labcfg, tmp_path / "out")
    assert runs and all(Path(r.base) == ROOT / "configs/grpo_tiny.py" for r in runs)
    with pytest.raises(FileNotFoundError, match=f"lab config configs/nope.py not found in {tmp_path} or in the "
                                                f"repository {ROOT}"):
        lab.load_lab("configs/nope.py")


def test_bad_lab_config_exit_code_from_the_command_line(tmp_path):
    cfg = write_lab(tmp_path / "lab.py", tmp_path / "world", tmp_path / "out", tmp_path / "cache", seeds=[])
    res = subprocess.run([sys.executable, "-m", "sqlr1.lab", "--config", str(cfg)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.strip().startswith("error: ") and "Traceback" not in res.stderr


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name: [state, parent pid, process group, ...]; [] once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return []


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _children_of(parent: int) -> set[int]:
    """pids of the live train.py processes `parent` started (each leads its own process group)."""
    found = set()
    for pid in _pids():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if "train.py" in cmd and (stat := _stat(pid)) and stat[0] != "Z" and int(stat[1]) == parent:
            found.add(pid)
    return found


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 600):
    """Poll `condition` until it is truthy (returned) while `proc` runs; fails naming `what` after `timeout` s."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if value := condition():
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} (lab exit code {proc.poll()})")


def _results(out: Path) -> dict:
    try:
        return json.loads((out / "lab.json").read_text())["results"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return {}


def _sft_of_seed(cache: Path, seed: int) -> Path:
    return next(d for d in cache.glob("sft-*") if json.loads((d / "config.json").read_text())["seed"] == seed)


@pytest.fixture(scope="module")
def micro_lab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lab")
    world = build_toyworld(tmp / "world", seed=0, num_train_dbs=4, num_dev_dbs=1, dev_questions_per_db=20)
    out, cache = tmp / "out", tmp / "cache"
    cfg = write_lab(tmp / "lab.py", world, out, cache)
    cmd = [sys.executable, "-m", "sqlr1.lab", "--config", str(cfg)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    # 1) the lab, started; while its SFT runs are under way (its train.py children exist), a second lab on the same
    # folder, and a third on another folder sharing the SFT cache, started outside the repository (jobs=1, seed 0,
    # one small GRPO step, settings outside the SFT key: it needs the first lab's sft/seed0)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    groups = set(_wait_for(lambda: _children_of(proc.pid), proc, "the lab started no train.py"))
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    other = tmp / "outside"
    other.mkdir()
    sharer_cfg = write_lab(other / "lab.py", world, other / "out", cache, seeds=[0], variants={"grpo": []}, jobs=1,
                           base_overrides=[*micro_overrides(world), "--grpo_steps=1", "--prompts_per_step=1",
                                           "--group_size=2"])
    with open(other / "stderr", "w") as err:
        sharer = subprocess.Popen([sys.executable, "-m", "sqlr1.lab", "--config", str(sharer_cfg)], cwd=other,
                                  env=env, stdout=subprocess.DEVNULL, stderr=err)

    # 2) interrupted once its first GRPO run is recorded in lab.json and its next runs are under way
    def first_result_and_runs_under_way():
        live = _children_of(proc.pid)
        groups.update(live)
        return (first := _results(out)) and live and first

    first = _wait_for(first_result_and_runs_under_way, proc, "no GRPO run finished with others under way")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    interrupted = {"rc": proc.returncode, "stderr": stderr, "groups": groups, "first": first}
    finished_metrics = {(name, seed): Path(v["run_dir"]) / "metrics.jsonl"
                        for name, per_seed in first.items() for seed, v in per_seed.items()}
    before = {k: (p.stat().st_mtime_ns, p.read_bytes()) for k, p in finished_metrics.items()}
    sft_mtimes = {p: (p / "metrics.jsonl").stat().st_mtime_ns for p in cache.glob("sft-*")}

    # 3) the same command again: continues
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    after = {k: (p.stat().st_mtime_ns, p.read_bytes()) for k, p in finished_metrics.items()}
    sharer_rc = sharer.wait(timeout=600)
    return dict(out=out, cache=cache, world=world, interrupted=interrupted, before=before, after=after,
                sft_mtimes=sft_mtimes, stdout=res.stdout, cfg=cfg, cmd=cmd, env=env,
                second={"rc": second.returncode, "stderr": second.stderr, "pid": proc.pid},
                sharer={"rc": sharer_rc, "stderr": (other / "stderr").read_text(), "out": other / "out"})


def test_interrupt_kills_every_child_and_says_how_to_continue(micro_lab):
    it = micro_lab["interrupted"]
    assert it["rc"] == 130, it["stderr"][-2000:]
    assert "continue with: python -m sqlr1.lab --config" in it["stderr"] and "Traceback" not in it["stderr"]
    assert it["groups"], "no train.py child was seen while the lab ran"
    for _ in range(50):  # killed processes are reaped by init shortly after the lab exits
        left = [pid for pid in _pids() if (stat := _stat(pid)) and int(stat[2]) in it["groups"]]
        if not left:
            break
        time.sleep(0.1)
    assert not left, f"processes of the lab's runs survived the interrupt: {left}"


def test_a_second_lab_on_the_same_folder_is_refused_before_it_touches_anything(micro_lab):
    """Started while the first lab's SFT runs were under way: one error line naming the first lab's PID and lock,
    exit 2 (the first lab then went on to its first GRPO result undisturbed: the fixture waits for it)."""
    second = micro_lab["second"]
    err = second["stderr"].strip().splitlines()
    assert second["rc"] == 2 and len(err) == 1, second["stderr"][-2000:]
    assert err[0] == (f"error: {micro_lab['out']} is in use by another lab (PID {second['pid']}, holding "
                      f"{micro_lab['out'] / 'lab.lock'}); wait for it to end or stop it, then rerun")


def test_a_lab_sharing_the_sft_cache_uses_the_sft_run_another_lab_is_making(micro_lab):
    """A lab on another folder, with the same cache and a seed whose SFT run the first lab was making (started outside
    the repository, base="configs/grpo_tiny.py"): it waits for that run instead of removing it, and starts from it."""
    sharer = micro_lab["sharer"]
    assert sharer["rc"] == 0, sharer["stderr"][-3000:]
    sft0 = _sft_of_seed(micro_lab["cache"], 0)
    run = json.loads((sharer["out"] / "grpo" / "seed0" / "config.json").read_text())
    assert run["model"] == str((sft0 / "final").absolute()) and run["grpo_steps"] == 1
    # made by the first lab (jobs=2 adds --sandbox_workers=1 to its commands), not again by this one (jobs=1)
    assert "--sandbox_workers=1" in (sft0 / "train.log").read_text().splitlines()[0]
    assert set(json.loads((sharer["out"] / "lab.json").read_text())["results"]) == {"grpo"}


def test_resume_does_not_redo_finished_runs(micro_lab):
    assert micro_lab["before"] and micro_lab["before"] == micro_lab["after"]
    for sft, mtime in micro_lab["sft_mtimes"].items():  # finished SFT runs are not redone either
        assert (sft / "metrics.jsonl").stat().st_mtime_ns == mtime


def test_sft_runs_once_per_seed_and_every_grpo_run_starts_from_it(micro_lab):
    out, cache = micro_lab["out"], micro_lab["cache"]
    sfts = sorted(cache.glob("sft-*"))
    assert len(sfts) == 2
    seeds = {json.loads((d / "config.json").read_text())["seed"]: d for d in sfts}
    assert set(seeds) == {0, 1}
    for d in sfts:
        assert json.loads((d / "config.json").read_text())["grpo_steps"] == 0
    for variant in ("grpo", "arctic"):
        for seed in (0, 1):
            run = out / variant / f"seed{seed}"
            cfg = json.loads((run / "config.json").read_text())
            assert cfg["model"] == str((seeds[seed] / "final").absolute()) and cfg["sft_steps"] == 0
            evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval:' in x]
            # no step-0 evaluation of the SFT weights; the intermediate one greedy only, the final one voted too
            assert [(e["stage"], "ex_voted" in e) for e in evals] == [("eval:grpo@2", False), ("eval:grpo", True)]


def test_outputs_name_both_variants_with_the_paired_sft_row(micro_lab):
    out = micro_lab["out"]
    record = json.loads((out / "lab.json").read_text())
    assert set(record["results"]) == {"grpo", "arctic"}
    for per_seed in record["results"].values():
        assert set(per_seed) == {"0", "1"}
        for v in per_seed.values():
            assert v["ex_curve"][0][0] == 0 and len(v["reward_curve"]) == 4 and v["s_per_step"] > 0
    md = (out / "lab.md").read_text()
    for row in ("| SFT | 2 |", "| grpo | 2 |", "| arctic | 2 |", "wall time of the lab"):
        assert row in md
    assert md in micro_lab["stdout"]
    # the Arctic row was paid Arctic's reward: totals in {0, 0.1, 1} only
    arctic_rewards = [json.loads(x)["reward"] for x in (out / "arctic" / "seed0" / "samples.jsonl").read_text().splitlines()]
    assert arctic_rewards and set(arctic_rewards) <= {0.0, 0.1, 1.0}


def test_sft_cache_key_follows_what_changes_sft(micro_lab):
    world = micro_lab["world"]
    base = [f"--data_root={world}", "--sft_steps=10"]
    key = lab.sft_key("configs/grpo_tiny.py", base, 0)
    assert lab.sft_key("configs/grpo_tiny.py", [*base, "--lr=1e-3", "--grpo.clip_high=0.3"], 0) == key  # GRPO-only
    assert lab.sft_key("configs/grpo_tiny.py", [*base, "--sandbox_workers=1"], 0) == key
    # evaluation-schedule overrides (configs/lab_toy.py's --eval_every, --eval_vote) do not change the key
    assert lab.sft_key("configs/grpo_tiny.py", [*base, "--eval_every=25", "--eval_vote=final"], 0) == key
    assert lab.sft_key("configs/grpo_tiny.py", base, 1) != key
    assert lab.sft_key("configs/grpo_tiny.py", [*base, "--sft_lr=1e-3"], 0) != key
    assert lab.sft_key("configs/grpo_tiny.py", [*base, "--eval_limit=3"], 0) != key  # the SFT row's evaluation


def test_a_variant_that_changes_sft_gets_its_own_sft_run(micro_lab, tmp_path, monkeypatch):
    """GRPO-only variants share one SFT per seed; a variant changing what SFT computes (here sft_steps, in the
    multi-turn lab the cold-start split) is paired with its own SFT run, keyed like every other."""
    monkeypatch.chdir(ROOT)
    cfg = write_lab(tmp_path / "lab.py", micro_lab["world"], tmp_path / "out", micro_lab["cache"],
                    variants={"grpo": [], "arctic": ["--reward.preset=arctic"], "long": ["--sft_steps=12"]})
    labcfg = lab.load_lab(cfg)
    runs, sfts = lab.plan(labcfg, tmp_path / "out")
    assert sorted(sfts) == ["sft/seed0", "sft/seed1", "sft:long/seed0", "sft:long/seed1"]
    by_label = {r.label: r for r in runs}
    for seed in (0, 1):
        assert by_label[f"grpo/seed{seed}"].needs == by_label[f"arctic/seed{seed}"].needs == f"sft/seed{seed}"
        assert by_label[f"long/seed{seed}"].needs == f"sft:long/seed{seed}"
        assert sfts[f"sft:long/seed{seed}"].total_steps == 12 and "--sft_steps=12" in sfts[f"sft:long/seed{seed}"].args
        assert sfts[f"sft:long/seed{seed}"].dir != sfts[f"sft/seed{seed}"].dir
    # the shared SFT runs are the ones the micro lab already ran (same key): nothing new to do for them
    assert all(lab.is_done(sfts[f"sft/seed{s}"]) for s in (0, 1))


def test_what_counts_as_a_damaged_run(micro_lab, tmp_path):
    """Found from headers and listings only: unreadable config.json, missing tokenizer or weights, truncated weights;
    an unparseable metrics.jsonl makes a run unfinished rather than an error."""
    src = _sft_of_seed(micro_lab["cache"], 0)
    assert lab.damage(src) is None and lab.run_finished(src, 10)

    def copy() -> Path:
        return Path(shutil.copytree(src, tmp_path / f"run{len(list(tmp_path.iterdir()))}"))

    (run := copy()).joinpath("final/config.json").write_text("{")
    assert "config.json: not valid JSON" in lab.damage(run)
    (run := copy()).joinpath("final/tokenizer.json").unlink()
    assert lab.damage(run) == f"{run / 'final/tokenizer.json'} is missing"
    (run := copy()).joinpath("final/model.safetensors").unlink()
    assert "no weights found" in lab.damage(run)
    weights = (run := copy()) / "final/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert lab.damage(run).startswith(f"{weights}: not a readable safetensors file")
    metrics = (run := copy()) / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[:-20])  # a line cut short
    assert not lab.run_finished(run, 10)


def test_a_damaged_cached_sft_model_is_run_again(micro_lab):
    """A cached SFT run whose weights were truncated after it finished (a broken copy, a full disk) is found before
    a GRPO run loads it, said in one line, and run again; seed 1's GRPO runs, recorded with the same command, stay."""
    sft1 = _sft_of_seed(micro_lab["cache"], 1)
    weights = sft1 / "final" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    stamp = (sft1 / "metrics.jsonl").stat().st_mtime_ns
    grpo = {p: p.stat().st_mtime_ns for p in micro_lab["out"].glob("*/seed1/metrics.jsonl")}
    res = subprocess.run([*micro_lab["cmd"], "--seeds=1"], cwd=ROOT, env=micro_lab["env"], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (f"sft/seed1: the cached SFT model in {sft1} is damaged ({weights}: not a readable safetensors file"
            in res.stderr)
    assert lab.damage(sft1) is None and (sft1 / "metrics.jsonl").stat().st_mtime_ns != stamp
    assert len(grpo) == 2 and {p: p.stat().st_mtime_ns for p in grpo} == grpo


# Ctrl-C landing inside a class's __set_name__ while matplotlib.pyplot is imported (the lab's plot), where Python
# turns the KeyboardInterrupt into a RuntimeError: matplotlib's descriptor is wrapped to send the SIGINT itself, at
# that point, so the test does not depend on timing.
SIGINT_INSIDE_MATPLOTLIB = """
import os, signal, sys

from matplotlib import _api

original = _api.deprecate_privatize_attribute.__set_name__


def set_name(self, owner, name):
    _api.deprecate_privatize_attribute.__set_name__ = original
    os.kill(os.getpid(), signal.SIGINT)
    return original(self, owner, name)


_api.deprecate_privatize_attribute.__set_name__ = set_name
from sqlr1 import lab

sys.exit(lab.cli(sys.argv[1:]))
"""


def test_an_interrupt_inside_matplotlibs_import_is_the_interrupt(micro_lab):
    """The lab (every run finished) writes its outputs and imports matplotlib for lab.png; the SIGINT lands in that
    import: the one interrupt line and exit 130, not the RuntimeError it became."""
    res = subprocess.run([sys.executable, "-c", SIGINT_INSIDE_MATPLOTLIB, "--config", str(micro_lab["cfg"])], cwd=ROOT,
                         env=micro_lab["env"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 130, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1].startswith(f"interrupted: finished runs are kept in {micro_lab['out']}")
    assert "error:" not in res.stderr and "Traceback" not in res.stderr


def test_an_edited_variant_runs_again_and_only_it(micro_lab):
    """Runs last (it changes the lab): arctic's overrides edited, --seeds=0 from the command line -> only
    arctic/seed0 is redone; grpo/seed0 and the SFT cache are untouched."""
    out, cfg = micro_lab["out"], micro_lab["cfg"]
    cfg.write_text(cfg.read_text().replace("'--reward.preset=arctic'", "'--reward.preset=arctic', '--grpo.clip_high=0.3'"))
    stamp = {p: p.stat().st_mtime_ns for p in (out / "grpo/seed0/metrics.jsonl", out / "arctic/seed0/metrics.jsonl")}
    sfts = {p: p.stat().st_mtime_ns for p in micro_lab["cache"].glob("sft-*/metrics.jsonl")}
    res = subprocess.run([*micro_lab["cmd"], "--seeds=0"], cwd=ROOT, env=micro_lab["env"], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "grpo/seed0/metrics.jsonl").stat().st_mtime_ns == stamp[out / "grpo/seed0/metrics.jsonl"]
    assert (out / "arctic/seed0/metrics.jsonl").stat().st_mtime_ns != stamp[out / "arctic/seed0/metrics.jsonl"]
    assert json.loads((out / "arctic/seed0/config.json").read_text())["grpo"]["clip_high"] == 0.3
    assert {p: p.stat().st_mtime_ns for p in micro_lab["cache"].glob("sft-*/metrics.jsonl")} == sfts
    assert set(json.loads((out / "lab.json").read_text())["results"]["arctic"]) == {"0"}


def test_sft_checkpoint_runs_once_and_returns_the_final_model(tmp_path, monkeypatch):
    """The public entry point for other tools (the TRL referee): a run without evaluation is cached too."""
    monkeypatch.chdir(ROOT)
    world = build_toyworld(tmp_path / "world", seed=0, num_train_dbs=2, num_dev_dbs=1, dev_questions_per_db=4)
    overrides = [f"--data_root={world}", "--sft_steps=2", "--sft_batch_size=4", "--eval_split="]
    final = lab.sft_checkpoint("configs/grpo_tiny.py", overrides, 0, tmp_path / "cache")
    assert (final / "config.json").is_file() and (final / "tokenizer.json").is_file()
    stamp = (final.parent / "metrics.jsonl").stat().st_mtime_ns
    assert lab.sft_checkpoint("configs/grpo_tiny.py", overrides, 0, tmp_path / "cache") == final
    assert (final.parent / "metrics.jsonl").stat().st_mtime_ns == stamp
    assert json.loads((final.parent / "config.json").read_text())["grpo_steps"] == 0


def test_a_run_directory_in_use_is_never_removed(tmp_path):
    """Another lab or benchmark on the same cache holds a run's lock (train.py's): the lab refuses to start it
    over and names the holder; once the lock is free, the unfinished directory is removed."""
    from sqlr1.run import lock_run_dir

    run = tmp_path / "sft-abc"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    held = lock_run_dir(run)
    with pytest.raises(ValueError, match=rf"in use by another training process \(PID {os.getpid()}"):
        lab._clear(run)
    assert (run / "metrics.jsonl").is_file()
    held.close()
    lab._clear(run)
    assert not run.exists()
