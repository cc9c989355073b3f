"""Config files and --key=value overrides."""

import json

import pytest

from sqlr1.config import TrainConfig, config_dict, load_config, save_config


def write(tmp_path, body: str):
    path = tmp_path / "cfg.py"
    path.write_text("from sqlr1.config import TrainConfig\n" + body)
    return path


def test_file_and_overrides_are_typed(tmp_path):
    path = write(tmp_path, "config = TrainConfig(lr=1e-6, group_size=4)\n")
    cfg = load_config(path, ["--lr=2e-6", "--group_size=16", "--gradient_checkpointing=false",
                             "--grpo.kl_coef=0", "--reward.mode=bird", "--adam_betas=0.9,0.95"])
    assert cfg.name == "cfg"  # defaults to the file name
    assert cfg.lr == 2e-6 and cfg.group_size == 16 and cfg.gradient_checkpointing is False
    assert cfg.grpo.kl_coef == 0.0 and cfg.reward.mode == "bird" and cfg.adam_betas == (0.9, 0.95)


def test_unknown_key_names_the_closest_valid_one(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'grop_size'.*did you mean group_size"):
        load_config(None, ["--grop_size=4"])
    with pytest.raises(ValueError, match=r"'grpo.kl_coeff'.*grpo.kl_coef"):
        load_config(None, ["--grpo.kl_coeff=0.1"])


def test_bad_values_and_files(tmp_path):
    with pytest.raises(ValueError, match="--group_size='eight': expected int"):
        load_config(None, ["--group_size=eight"])
    with pytest.raises(ValueError, match="expected bool"):
        load_config(None, ["--shared_prefix=maybe"])
    with pytest.raises(ValueError, match="compile='maybe': choose one of auto, true, false"):
        load_config(None, ["--compile=maybe"])
    with pytest.raises(ValueError, match="prompt_template='long': choose one of sqlr1, short"):
        load_config(None, ["--prompt_template=long"])
    with pytest.raises(ValueError, match="group_size=0: must be >= 1"):
        load_config(None, ["--group_size=0"])
    with pytest.raises(ValueError, match="--key=value"):
        load_config(None, ["--lr"])
    with pytest.raises(FileNotFoundError, match="nope.py"):
        load_config(tmp_path / "nope.py")
    with pytest.raises(ValueError, match="must define `config = TrainConfig"):
        load_config(write(tmp_path, "x = 1\n"))


def test_saved_config_is_complete_json(tmp_path):
    cfg = load_config(None, ["--grpo.clip_high=0.28"])
    save_config(cfg, tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["grpo"]["clip_high"] == 0.28 and saved["lr"] == TrainConfig().lr


def test_shipped_configs_load():
    from pathlib import Path

    from dataclasses import replace

    from sqlr1.lab import LabConfig, load_lab, validate

    root = Path(__file__).resolve().parents[1]
    for path in sorted((root / "configs").glob("*.py")):
        if path.name.startswith("lab_"):  # lab configs (sqlr1/lab.py): a LabConfig whose every variant loads
            lab = load_lab(path)
            assert isinstance(lab, LabConfig)
            validate(replace(lab, base=str(root / lab.base)), str(path))
        else:
            assert isinstance(load_config(path), TrainConfig)


@pytest.mark.parametrize("override", [
    "--grad_clip=-1", "--lr=-1", "--lr=nan", "--temperature=nan", "--top_p=0", "--top_k=-3",
    "--eval_temperature=-1", "--reward.timeout=nan", "--reward.w_r=inf", "--grpo.clip_low=nan",
    "--grpo.kl_coef=nan", "--adam_betas=0.9,1.5", "--eval_batch_size=-1",
])
def test_out_of_range_numbers_are_refused_before_training(override):
    """Numbers that would silently train uphill, switch off the SQL deadline or make every loss NaN (NaN included)."""
    key = override.removeprefix("--").split("=")[0]
    with pytest.raises(ValueError, match=key.split(".")[-1]):
        load_config(None, [override])


def saved_dict(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(config_dict(cfg)))  # what config.json holds


def test_resume_allows_more_steps_and_logistics_and_names_what_changed():
    from sqlr1.config import resume_changes

    run = TrainConfig(sft_steps=4, grpo_steps=10, save_every=5)
    more = TrainConfig(sft_steps=4, grpo_steps=20, save_every=2, keep_last=3, eval_every=5, wandb_project="p")
    changes = resume_changes(saved_dict(run), more, step=8, stage="grpo", source="run/config.json")
    assert changes == {"grpo_steps": [10, 20], "save_every": [5, 2], "keep_last": [0, 3], "eval_every": [0, 5],
                       "wandb_project": ["", "p"]}
    assert resume_changes(saved_dict(run), run, step=8, stage="grpo", source="x") == {}
    # SFT may grow while no GRPO step is done
    assert resume_changes(saved_dict(run), TrainConfig(sft_steps=6, grpo_steps=10, save_every=5), step=3,
                          stage="sft", source="x") == {"sft_steps": [4, 6]}
    # a setting added to TrainConfig after the run was saved counts as its default
    old = saved_dict(run)
    del old["keep_last"]
    assert resume_changes(old, run, step=8, stage="grpo", source="x") == {}


@pytest.mark.parametrize("override, step, stage, match", [
    ("--lr=1e-6", 8, "grpo", r"lr=1e-06 differs from the run's lr=3e-07 in run/config.json"),
    ("--model=other", 8, "grpo", r"model='other' differs from the run's model=''"),
    ("--group_size=4", 8, "grpo", r"group_size=4 differs from the run's group_size=8"),
    ("--grpo.kl_coef=0.5", 8, "grpo", r"grpo.kl_coef=0.5 differs"),
    ("--seed=3", 1, "sft", r"seed=3 differs"),
    ("--sft_steps=6", 8, "grpo", r"sft_steps=6 differs .* has done 4 SFT and 4 GRPO steps"),
    ("--grpo_steps=3", 8, "grpo", r"grpo_steps=3 differs .* has done 4 GRPO steps"),
    ("--sft_steps=2", 3, "sft", r"sft_steps=2 differs"),
])
def test_resume_refuses_settings_that_change_what_the_steps_compute(override, step, stage, match):
    from sqlr1.config import resume_changes

    run = TrainConfig(sft_steps=4, grpo_steps=10)
    with pytest.raises(ValueError, match=match):
        resume_changes(saved_dict(run), load_config(None, ["--sft_steps=4", "--grpo_steps=10", override]),
                       step=step, stage=stage, source="run/config.json")


def test_keep_last_must_not_be_negative():
    with pytest.raises(ValueError, match="keep_last=-1: must be >= 0"):
        load_config(None, ["--keep_last=-1"])
