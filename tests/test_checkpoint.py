"""Tests for sqlr1/checkpoint.py and sqlr1/hub.py: HF checkpoints written by transformers load into our Qwen2 with
the same logits, ours load back (in sqlr1 and in transformers), saving is atomic, and bad checkpoints fail with one
clear line."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from sqlr1.checkpoint import INDEX_FILE, SINGLE_FILE, load_model, parse_size, save_model, save_state_dict
from sqlr1.hub import resolve_checkpoint
from sqlr1.model import ModelConfig, Qwen2

transformers = pytest.importorskip("transformers")

# Odd sizes on purpose: hidden 40 with 5 query heads of dim 8 sharing 1 KV head (GQA ratio 5), a vocabulary that
# is not a power of two, and a non-default RoPE base so that reading rope_theta/rope_parameters matters.
TINY = dict(vocab_size=101, hidden_size=40, intermediate_size=72, num_hidden_layers=3, num_attention_heads=5,
            num_key_value_heads=1, max_position_embeddings=64, rope_theta=50_000.0, rms_norm_eps=1e-5)


def hf_model(tie: bool, seed: int = 0, **overrides):
    """A random transformers Qwen2ForCausalLM: every weight random (biases and norms too) so that each one matters."""
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(**{**TINY, **overrides}, tie_word_embeddings=tie)
    model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def hf_checkpoint(request, tmp_path_factory):
    """(transformers model, its directory saved sharded by save_pretrained)."""
    model = hf_model(tie=request.param)
    d = tmp_path_factory.mktemp("hf")
    model.save_pretrained(d, safe_serialization=True, max_shard_size="20KB")
    return model, d


def left_padded_batch(seed: int = 1):
    """Token ids [3, 11] with rows of real lengths 11, 6, 1 (left padding with id 0) and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    lengths = [11, 6, 1]
    ids = torch.randint(1, TINY["vocab_size"], (len(lengths), max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, ids.shape[1] - n :] = 1
    return ids * mask, mask


def hf_logits(model, ids, mask=None):
    """transformers' logits; with left padding it needs the positions generate() would give (real tokens before)."""
    kwargs = {}
    if mask is not None:
        kwargs = dict(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        return model(ids, **kwargs).logits


def test_hf_checkpoint_is_sharded(hf_checkpoint):
    _, d = hf_checkpoint
    assert (d / INDEX_FILE).is_file() and len(list(d.glob("model-*.safetensors"))) > 2


def test_fp32_parity_with_transformers(hf_checkpoint):
    hf, d = hf_checkpoint
    ours = load_model(d, dtype=torch.float32)
    assert not ours.training and ours.config.rope_theta == TINY["rope_theta"]
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == hf.config.tie_word_embeddings
    ids = torch.randint(0, TINY["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(ids) - hf_logits(hf, ids)).abs().max().item()
    assert diff <= 1e-5


def test_fp32_parity_left_padded(hf_checkpoint):
    hf, d = hf_checkpoint
    ours = load_model(d, dtype=torch.float32)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        diff = (ours(ids, attention_mask=mask) - hf_logits(hf, ids, mask)).abs().amax(-1)
    assert diff[mask.bool()].max().item() <= 1e-5


def test_bf16_parity_with_transformers(hf_checkpoint):
    hf, d = hf_checkpoint
    ours = load_model(d, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    hf16 = transformers.Qwen2ForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
    ids, mask = left_padded_batch(seed=2)
    with torch.no_grad():
        ours_logits = ours(ids, attention_mask=mask).float()
        diff = (ours_logits - hf_logits(hf16, ids, mask).float()).abs().amax(-1)[mask.bool()].max().item()
        scale = hf_logits(hf, ids, mask).abs().max().item()
    # bf16 keeps 8 mantissa bits: relative rounding 2^-8 per op; allow a few roundings of the largest logit.
    assert diff <= 4 * 2**-8 * scale


def test_round_trip_ours_and_transformers(hf_checkpoint, tmp_path):
    hf, d = hf_checkpoint
    model = load_model(d, dtype=torch.float32)
    out = save_model(model, tmp_path / "ours", max_shard_size="10KB", generation_config={"eos_token_id": [7, 9]})
    files = sorted(p.name for p in out.iterdir())
    n = len(list(out.glob("model-*.safetensors")))
    assert n > 2 and INDEX_FILE in files and SINGLE_FILE not in files
    assert json.loads((out / "generation_config.json").read_text()) == {"eos_token_id": [7, 9]}
    index = json.loads((out / INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == {f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)}
    assert ("lm_head.weight" in index["weight_map"]) != model.config.tie_word_embeddings
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in load_all(out).values())
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "float32"

    ids, mask = left_padded_batch(seed=3)
    again = load_model(out, dtype=torch.float32)
    hf_again = transformers.Qwen2ForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask)
        assert torch.equal(again(ids, attention_mask=mask), expected)
        diff = (hf_logits(hf_again, ids, mask) - expected).abs().amax(-1)[mask.bool()].max().item()
    assert diff <= 1e-5
    assert hf_again.config.tie_word_embeddings == model.config.tie_word_embeddings


def load_all(d):
    tensors = {}
    for f in d.glob("*.safetensors"):
        tensors.update(load_file(f))
    return tensors


def test_single_file_save_and_bf16_dtype(tmp_path):
    model = tiny_model(tie=True)
    out = save_model(model.to(torch.bfloat16), tmp_path / "one")
    assert {p.name for p in out.iterdir()} == {SINGLE_FILE, "config.json"}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    stored = load_file(out / SINGLE_FILE)
    assert "lm_head.weight" not in stored and all(k.startswith("model.") for k in stored)
    loaded = load_model(out, dtype=torch.bfloat16)
    for name, p in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name


def tiny_model(tie: bool, seed: int = 0) -> Qwen2:
    model = Qwen2(ModelConfig(**TINY, tie_word_embeddings=tie))
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(seed))
    return model


def test_save_state_dict_views_and_tied_duplicate(tmp_path):
    """A full state dict as a trainer gathers it: tied head included, tensors that are views of one flat buffer."""
    model = tiny_model(tie=True)
    sd = model.state_dict()
    flat = torch.cat([t.reshape(-1) for t in sd.values()])
    views, i = {}, 0
    for name, t in sd.items():
        views[name] = flat[i : i + t.numel()].view(t.shape)
        i += t.numel()
    views["layers.0.mlp.up_proj.weight"] = sd["layers.0.mlp.up_proj.weight"].t().contiguous().t()  # non-contiguous
    assert not views["layers.0.mlp.up_proj.weight"].is_contiguous()
    out = save_state_dict(views, model.config, tmp_path / "m", max_shard_size=5000)
    loaded = load_model(out, dtype=torch.float32)
    for name, t in sd.items():
        assert torch.equal(loaded.state_dict()[name], t), name


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("five gigs")


# ---------------------------------------------------------------- atomic save


class Crash(RuntimeError):
    pass


def crash_after_first_shard(monkeypatch):
    """Make the second shard write die, as a full disk or a killed process would, after one shard hit the disk."""
    import sqlr1.checkpoint as ckpt

    real, calls = ckpt._write_shard, []

    def write(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise Crash("disk full")
        real(tensors, path)

    monkeypatch.setattr(ckpt, "_write_shard", write)
    return calls


def test_crash_mid_save_keeps_old_checkpoint(tmp_path, monkeypatch):
    old_model, new_model = tiny_model(tie=False, seed=0), tiny_model(tie=False, seed=1)
    target = save_model(old_model, tmp_path / "ckpt", max_shard_size="10KB")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    calls = crash_after_first_shard(monkeypatch)
    with pytest.raises(Crash):
        save_model(new_model, target, max_shard_size="10KB")
    assert len(calls) == 2  # the first shard was really written before the crash
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary or set-aside directory left
    monkeypatch.undo()
    save_model(new_model, target, max_shard_size="10KB")  # a later save replaces it completely
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    loaded = load_model(target, dtype=torch.float32)
    assert torch.equal(loaded.embed_tokens.weight, new_model.embed_tokens.weight)


def test_crash_mid_save_leaves_no_target(tmp_path, monkeypatch):
    crash_after_first_shard(monkeypatch)
    with pytest.raises(Crash):
        save_model(tiny_model(tie=True), tmp_path / "new", max_shard_size="10KB")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- bad input: one line naming the thing


@pytest.fixture
def single_file_checkpoint(tmp_path):
    """A tiny untied checkpoint in one model.safetensors (easy to edit)."""
    return save_model(tiny_model(tie=False), tmp_path / "ckpt")


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def edit_weights(d, edit):
    tensors = load_file(d / SINGLE_FILE)
    edit(tensors)
    save_file(tensors, d / SINGLE_FILE, metadata={"format": "pt"})


def expect_error(d, exc, *fragments):
    with pytest.raises(exc) as info:
        load_model(d, dtype=torch.float32)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_config(single_file_checkpoint):
    (single_file_checkpoint / "config.json").unlink()
    expect_error(single_file_checkpoint, FileNotFoundError, "config.json")


def test_missing_weights(single_file_checkpoint):
    (single_file_checkpoint / SINGLE_FILE).unlink()
    expect_error(single_file_checkpoint, FileNotFoundError, SINGLE_FILE, INDEX_FILE)


def test_missing_key(single_file_checkpoint):
    edit_weights(single_file_checkpoint, lambda t: t.pop("model.layers.2.self_attn.k_proj.bias"))
    expect_error(single_file_checkpoint, ValueError, "model.layers.2.self_attn.k_proj.bias", "missing", SINGLE_FILE)


def test_missing_key_sharded(tmp_path):
    d = save_model(tiny_model(tie=False), tmp_path / "m", max_shard_size="10KB")
    index = json.loads((d / INDEX_FILE).read_text())
    del index["weight_map"]["model.norm.weight"]
    (d / INDEX_FILE).write_text(json.dumps(index))
    expect_error(d, ValueError, "model.norm.weight", INDEX_FILE)


def test_missing_shard_file(tmp_path):
    d = save_model(tiny_model(tie=False), tmp_path / "m", max_shard_size="10KB")
    second = sorted(d.glob("model-*.safetensors"))[1]
    second.unlink()
    expect_error(d, FileNotFoundError, second.name, "does not exist")


def test_unexpected_key(single_file_checkpoint):
    edit_weights(single_file_checkpoint, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(3)}))
    expect_error(single_file_checkpoint, ValueError, "unexpected", "model.layers.0.extra.weight")


def test_shape_mismatch(single_file_checkpoint):
    name = "model.layers.1.self_attn.q_proj.weight"
    edit_weights(single_file_checkpoint, lambda t: t.update({name: torch.zeros(7, 40)}))
    expect_error(single_file_checkpoint, ValueError, name, "(7, 40)", "(40, 40)")


@pytest.mark.parametrize(
    "changes, fragments",
    [
        (dict(model_type="llama", architectures=["LlamaForCausalLM"]), ["model_type='llama'", "Qwen2"]),
        (dict(use_sliding_window=True, sliding_window=16), ["use_sliding_window"]),
        (dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
         ["rope_scaling", "yarn"]),
        (dict(hidden_act="gelu"), ["hidden_act", "gelu"]),
        (dict(rope_scaling=None, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}),
         ["rope_parameters", "yarn"]),  # transformers >= 5 spelling
        (dict(hidden_size="40"), ["hidden_size='40'"]),
        (dict(num_key_value_heads=2), ["num_key_value_heads=2"]),
    ],
    ids=["architecture", "sliding_window", "yarn", "activation", "yarn_v5", "string_size", "heads"],
)
def test_unsupported_config(single_file_checkpoint, changes, fragments):
    edit_config(single_file_checkpoint, **changes)
    expect_error(single_file_checkpoint, ValueError, "config.json", *fragments)


def test_missing_config_keys_take_transformers_defaults(single_file_checkpoint):
    """A config.json without tie_word_embeddings / rope_theta means what transformers reads: untied, theta 1e4."""
    cfg = json.loads((single_file_checkpoint / "config.json").read_text())
    del cfg["tie_word_embeddings"], cfg["rope_theta"]
    (single_file_checkpoint / "config.json").write_text(json.dumps(cfg))
    config = load_model(single_file_checkpoint, dtype=torch.float32).config
    reference = transformers.Qwen2Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    assert (config.tie_word_embeddings, config.rope_theta) == (False, 10000.0)
    assert reference.tie_word_embeddings is False and reference.rope_parameters["rope_theta"] == 10000.0


def test_a_missing_shape_key_is_named_not_blamed_on_a_weight(single_file_checkpoint):
    """config.json without num_hidden_layers: transformers' default (32) does not fit the stored layers; the error
    names the missing key and the value assumed, not only the first weight that is then missing."""
    cfg = json.loads((single_file_checkpoint / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (single_file_checkpoint / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json has no num_hidden_layers: transformers' defaults "
                                         r"num_hidden_layers=32 were assumed"):
        load_model(single_file_checkpoint, dtype=torch.float32)


def test_unreadable_files_are_named(single_file_checkpoint):
    (single_file_checkpoint / "config.json").write_text("{not json")
    expect_error(single_file_checkpoint, ValueError, "config.json", "not valid JSON")
    (single_file_checkpoint / "config.json").write_text("[1, 2]")
    expect_error(single_file_checkpoint, ValueError, "config.json", "JSON object")
    save_model(tiny_model(tie=False), single_file_checkpoint)
    (single_file_checkpoint / SINGLE_FILE).write_bytes(b"\x00" * 100)
    expect_error(single_file_checkpoint, ValueError, SINGLE_FILE, "safetensors")


def test_tied_config_with_a_different_stored_head(tmp_path):
    d = save_model(tiny_model(tie=False), tmp_path / "m")
    edit_config(d, tie_word_embeddings=True)
    expect_error(d, ValueError, SINGLE_FILE, "lm_head.weight differs", "tie_word_embeddings")
    edit_weights(d, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    model = load_model(d, dtype=torch.float32)  # a stored copy equal to the embedding is fine
    assert model.lm_head.weight is model.embed_tokens.weight


def test_save_never_replaces_a_folder_that_is_not_a_checkpoint(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "notes.txt").write_text("keep me")
    model = tiny_model(tie=False)
    with pytest.raises(ValueError, match="not a checkpoint"):
        save_model(model, victim)
    (victim / "sub").rmdir()
    with pytest.raises(ValueError, match="no config.json"):
        save_model(model, victim)
    assert (victim / "notes.txt").read_text() == "keep me"
    monkeypatch.chdir(victim)
    with pytest.raises(ValueError, match="working directory"):
        save_model(model, ".")
    save_model(model, tmp_path / "ckpt")
    save_model(model, tmp_path / "ckpt")  # replacing a checkpoint is what saving is for
    assert (tmp_path / "ckpt" / "config.json").is_file()


def test_save_rejects_wrong_state_dict(tmp_path):
    model = tiny_model(tie=False)
    sd = model.state_dict()
    with pytest.raises(ValueError, match="lacks 'lm_head.weight'"):
        save_state_dict({k: v for k, v in sd.items() if k != "lm_head.weight"}, model.config, tmp_path / "a")
    with pytest.raises(ValueError, match="unexpected tensor 'model.norm.weight'"):
        save_state_dict({**sd, "model.norm.weight": sd["norm.weight"]}, model.config, tmp_path / "a")
    with pytest.raises(ValueError, match="mixed dtypes"):
        save_state_dict({**sd, "norm.weight": sd["norm.weight"].half()}, model.config, tmp_path / "a")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- where checkpoints come from


def test_resolve_local_directory(tmp_path):
    assert resolve_checkpoint(str(tmp_path)) == tmp_path


@pytest.mark.parametrize("path", ["./no/such/dir", "/no/such/dir", "runs/x/final"])
def test_resolve_missing_local_path(path):
    with pytest.raises(FileNotFoundError, match=f"checkpoint directory {path} does not exist"):
        resolve_checkpoint(path)


def test_resolve_file_is_not_a_checkpoint(single_file_checkpoint):
    with pytest.raises(NotADirectoryError, match="config.json"):
        load_model(single_file_checkpoint / "config.json")


def test_resolve_repo_id_offline(monkeypatch, tmp_path):
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        load_model("sqlr1-tests/no-such-model")
    message = str(info.value)
    assert "sqlr1-tests/no-such-model" in message and "--local-dir DIR" in message and "\n" not in message
    assert os.listdir(tmp_path) in ([], ["models--sqlr1-tests--no-such-model"])
