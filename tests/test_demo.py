"""The toy demo, shortened: `train.py` on a small toy world, SFT then GRPO through the real sandbox, in ~100 s.

The full demo (`python train.py --config configs/grpo_tiny.py`) is measured in benchmarks/RESULTS.md.
This is its smoke-and-direction check: the same command line on a 4-database world with 100 SFT and 30 GRPO steps
must finish and write its run directory, and GRPO must raise the training reward (mean of the second half of the
steps above the first: 0.28 -> 0.67 here) without lowering held-out EX. With the advantage sign flipped
(`A_i = -(r_i - mean) / std`) the same run's reward collapses to -1.0 (-0.02 -> -1.00 over the last ten steps) and
this test fails, as it must (checked by hand, see RESULTS.md).

The one run (a module fixture) is also what a new user looks at afterwards: its plots, the `sample.py` command it
prints, and its final model loaded by transformers.
"""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sqlr1.checkpoint import load_model
from sqlr1.data import SHORT_PROMPT, SQLR1_PROMPT, build_prompt, load_dataset
from sqlr1.sampling import SamplingParams, generate
from sqlr1.tokenizer import load_tokenizer
from sqlr1.toyworld import build_toyworld, init_model

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(world, run directory, stdout) of the short demo. Its initial model is the one train.py would create
    (init_model at the world's model_seed0), with three config.json keys a Qwen2.5 release has and ModelConfig does
    not model: every checkpoint must keep them."""
    tmp_path = tmp_path_factory.mktemp("demo")
    world = build_toyworld(tmp_path / "world", seed=0, num_train_dbs=4, num_dev_dbs=1, dev_questions_per_db=20)
    source = init_model(world / "model_seed0", world / "tokenizer", seed=0)
    tok = load_tokenizer(source)
    extra = {"bos_token_id": tok.pad_id, "eos_token_id": tok.eos_ids[0], "transformers_version": "4.43.1"}
    (source / "config.json").write_text(json.dumps({**json.loads((source / "config.json").read_text()), **extra}))
    run = tmp_path / "run"
    cmd = [
        sys.executable, "train.py", "--config", "configs/grpo_tiny.py", f"--data_root={world}", f"--out_dir={run}",
        "--sft_steps=100", "--grpo_steps=30", "--eval_n=1",
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)  # ~100 s; shared CPUs: slower
    assert out.returncode == 0, out.stderr[-3000:]
    return world, run, out.stdout


def test_short_demo_grpo_raises_training_reward_and_keeps_held_out_ex(demo):
    _, run, stdout = demo
    assert "EX greedy" in stdout and (run / "final" / "config.json").is_file()

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    grpo = [r["reward"] for r in records if r["stage"] == "grpo"]
    evals = {r["stage"]: r for r in records if r["stage"].startswith("eval:")}
    assert len(grpo) == 30 and set(evals) == {"eval:sft", "eval:grpo@25", "eval:grpo"}, set(evals)
    assert "ex_voted" not in evals["eval:grpo@25"]  # voting only at the end (eval_vote="final")
    first, second = sum(grpo[:15]) / 15, sum(grpo[15:]) / 15
    assert second > first, grpo
    assert evals["eval:grpo"]["ex_greedy"] >= evals["eval:sft"]["ex_greedy"], evals


def test_short_demo_draws_its_plots(demo):
    _, run, stdout = demo
    assert "plots skipped" not in stdout
    for name in ("run.png", "grpo.png"):
        data = (run / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, name


def test_readme_install_command_installs_the_plots_and_ci_runs_it():
    """The README's first command installs what plot_metrics needs; .ci/run runs its install and test commands."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    readme = (ROOT / "README.md").read_text()
    install = re.search(r"^(python3 -m venv \.venv && \.venv/bin/pip install (-e \"\.\[([\w,]+)\]\"))", readme, re.M)
    assert install, "README.md: no `python3 -m venv .venv && .venv/bin/pip install -e \".[...]\"` command"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installed = {pkg for extra in install.group(3).split(",") for pkg in extras[extra]}
    assert "matplotlib" in installed, install.group(1)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install.group(1) in ci
    assert ".venv/bin/python -m pytest -q" in readme and ".venv/bin/python -m pytest -q" in ci


def test_printed_sample_command_asks_a_held_out_question_and_runs(demo):
    world, run, stdout = demo
    lines = stdout.splitlines()
    assert "ask the final model a held-out question:" in lines, stdout[-2000:]
    words = shlex.split(lines[lines.index("ask the final model a held-out question:") + 1])
    args = dict(zip(words[2::2], words[3::2]))
    assert Path(words[1]).name == "sample.py" and Path(args["--model"]) == run / "final"
    dev = json.loads((world / "dev.json").read_text())
    train_dbs = {r["db_id"] for r in json.loads((world / "train.json").read_text())}
    db_id = Path(args["--db"]).stem
    assert db_id not in train_dbs and args["--question"] in [r["question"] for r in dev if r["db_id"] == db_id]
    proc = subprocess.run(words, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "=== reasoning and answer ===" in proc.stdout and "=== SQL (" in proc.stdout, proc.stdout[-2000:]


def test_final_model_keeps_source_config_and_stops_in_transformers_where_our_sampler_stops(demo):
    """Every checkpoint keeps the source's extra config.json keys and generation_config.json; transformers' greedy
    generate on final/ stops where sqlr1.sampling.generate (temperature 0, the tokenizer's stop ids) stops."""
    transformers = pytest.importorskip("transformers")
    world, run, _ = demo
    source = world / "model_seed0"
    source_config = json.loads((source / "config.json").read_text())
    models = [run / "final", *(run / "checkpoints").glob("step_*/model")]
    for d in models:
        saved = json.loads((d / "config.json").read_text())
        assert {k: saved[k] for k in ("bos_token_id", "eos_token_id", "transformers_version")} == {
            k: source_config[k] for k in ("bos_token_id", "eos_token_id", "transformers_version")}, d
        assert json.loads((d / "generation_config.json").read_text()) == json.loads(
            (source / "generation_config.json").read_text()), d

    final = run / "final"
    tok = load_tokenizer(final)
    settings = json.loads((final / "sqlr1_prompt.json").read_text())
    template = {"short": SHORT_PROMPT, "sqlr1": SQLR1_PROMPT}[settings["template"]]
    examples = load_dataset("spider", world, "dev")[:4]
    prompts = [build_prompt(ex, tok, template, 512, settings["sample_values"]).ids for ex in examples]
    ours_model = load_model(final, dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    stopped = 0
    for ids in prompts:
        ours = generate(ours_model, [ids], 1, SamplingParams(128, 0.0, stop_ids=tok.eos_ids, vocab_size=tok.vocab_size),
                        progress=False)
        prompt = torch.tensor([ids])
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=128)
        assert theirs[0, len(ids):].tolist() == ours.tokens[0]
        stopped += ours.finish_reason[0] == "stop"
    assert stopped > 0  # the comparison covers the stop token, not only two runs to max_new_tokens


def test_sample_command_quotes_any_question_for_the_shell():
    from sqlr1.data import Example
    from sqlr1.run import sample_command

    question = "Which club's name is \"$(echo hi)\" or `x`; rm -rf ~?"
    ex = Example(question=question, db_id="a b", db_path=Path("data dir/a b/a b.sqlite"), sql="", evidence="it's 'x'")
    words = shlex.split(sample_command(Path("runs/my run/final"), ex, 64))
    assert Path(words[1]).resolve() == ROOT / "sample.py"
    assert words[2:] == ["--model", "runs/my run/final", "--db", "data dir/a b/a b.sqlite", "--question", question,
                         "--evidence", "it's 'x'", "--max_new_tokens", "64"]
