"""Tests for sqlr1/tokenizer.py on a tiny byte-level BPE with Qwen's special tokens, built here with `tokenizers`.
The chat template is checked against transformers rendering Qwen2.5's ChatML jinja template."""

import json

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from sqlr1.checkpoint import load_model, save_model
from sqlr1.model import ModelConfig, Qwen2
from sqlr1.tokenizer import QWEN_DEFAULT_SYSTEM, load_tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "SELECT name, age FROM singer WHERE age > 30 ORDER BY age DESC;",
    "How many singers do we have? <think>count the rows</think> <answer>SELECT count(*) FROM singer</answer>",
    "Given the database schema, write the SQL query that answers the question.",
] * 5

# Qwen2.5's chat template (tokenizer_config.json "chat_template") restricted to conversations without tools.
QWEN25_TEMPLATE = r"""{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


def tiny_bpe() -> HFTokenizer:
    """Byte-level BPE (like Qwen's) trained on CORPUS, special tokens appended after the merges (like Qwen's)."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(SPECIALS)
    return tok


def write_tokenizer(d, tokenizer_config=None, generation_config=None):
    d.mkdir(parents=True, exist_ok=True)
    tiny_bpe().save(str(d / "tokenizer.json"))
    if tokenizer_config is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if generation_config is not None:
        (d / "generation_config.json").write_text(json.dumps(generation_config))
    return d


@pytest.fixture
def instruct_dir(tmp_path):
    """Laid out like Qwen2.5-Instruct: eos <|im_end|>, pad <|endoftext|>, generation eos [<|im_end|>, <|endoftext|>]."""
    ids = {t: tiny_bpe().token_to_id(t) for t in SPECIALS}
    return write_tokenizer(
        tmp_path / "tok",
        tokenizer_config={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "model_max_length": 4096},
        generation_config={"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]},
    )


def test_vocab_size_and_special_ids(instruct_dir):
    tok = load_tokenizer(instruct_dir)
    raw = HFTokenizer.from_file(str(instruct_dir / "tokenizer.json"))
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True) > raw.get_vocab_size(with_added_tokens=False)
    assert [tok.token_to_id(t) for t in SPECIALS] == list(range(tok.vocab_size - 3, tok.vocab_size))
    assert raw.id_to_token(tok.vocab_size) is None
    assert tok.token_to_id("<|no_such_token|>") is None


def test_stop_and_pad_ids(instruct_dir, tmp_path):
    eot, im_end = (tiny_bpe().token_to_id(t) for t in ("<|endoftext|>", "<|im_end|>"))
    tok = load_tokenizer(instruct_dir)
    assert tok.eos_ids == [im_end, eot] and tok.pad_id == eot
    # generation_config's eos_token_id may be a single int; it comes first, the other stop tokens follow
    base = load_tokenizer(write_tokenizer(tmp_path / "base", {"eos_token": {"content": "<|endoftext|>"}},
                                          {"eos_token_id": eot}))
    assert base.eos_ids == [eot, im_end] and base.pad_id == eot
    bare = load_tokenizer(write_tokenizer(tmp_path / "bare"))  # tokenizer.json only
    assert bare.eos_ids == [im_end, eot] and bare.pad_id == eot
    null = load_tokenizer(write_tokenizer(tmp_path / "null", None, {"eos_token_id": None}))  # as some configs write
    assert null.eos_ids == [im_end, eot]


def test_unreadable_files_are_named(tmp_path):
    broken = write_tokenizer(tmp_path / "a")
    (broken / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="tokenizer_config.json: not valid JSON"):
        load_tokenizer(broken)
    (broken / "tokenizer_config.json").unlink()
    (broken / "tokenizer.json").write_text('{"model": 1}')
    with pytest.raises(ValueError, match="tokenizer.json: not a readable tokenizer file"):
        load_tokenizer(broken)


def test_encode_decode(instruct_dir):
    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer(instruct_dir)
    text = "<|im_start|>user\nSELECT name FROM singer WHERE nom = 'café' -- 你好<|im_end|>\n<think>"
    ids = tok.encode(text)
    assert ids[0] == tok.token_to_id("<|im_start|>") and tok.token_to_id("<|im_end|>") in ids
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")
    assert max(ids) < tok.vocab_size
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(instruct_dir / "tokenizer.json"))
    assert ids == hf.encode(text, add_special_tokens=False)


CONVERSATIONS = {
    "user_only": [{"role": "user", "content": "How many singers?"}],
    "system_user": [{"role": "system", "content": "You are a SQL expert."},
                    {"role": "user", "content": "List the names.\nUse SQLite."}],
    "multi_turn": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "<think>a</think> A1"},
                   {"role": "user", "content": "Q2"}],
    "system_midway": [{"role": "system", "content": "S1"}, {"role": "user", "content": "Q"},
                      {"role": "system", "content": "S2"}, {"role": "assistant", "content": ""}],
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_template_matches_qwen25(instruct_dir, name, add_generation_prompt):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tiny_bpe(), chat_template=QWEN25_TEMPLATE)
    messages = CONVERSATIONS[name]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    ours = load_tokenizer(instruct_dir).apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ours == expected


def test_assistant_prefix_and_default_system(instruct_dir):
    tok = load_tokenizer(instruct_dir)
    messages = [{"role": "user", "content": "Q"}]
    text = tok.apply_chat_template(messages, assistant_prefix="<think>")
    assert text == (f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
                    "<|im_start|>assistant\n<think>")
    tok.default_system = None
    assert tok.apply_chat_template(messages) == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("system", ["You answer in SQL.", None])
def test_default_system_from_config_survives_save(tmp_path, system):
    tok = load_tokenizer(write_tokenizer(tmp_path / "a", {"eos_token": "<|im_end|>", "sqlr1_default_system": system}))
    assert tok.default_system == system
    tok.save(tmp_path / "b")
    again = load_tokenizer(tmp_path / "b")
    messages = [{"role": "user", "content": "Q"}]
    assert again.default_system == system
    assert again.apply_chat_template(messages) == tok.apply_chat_template(messages)
    assert (again.vocab_size, again.eos_ids, again.pad_id) == (tok.vocab_size, tok.eos_ids, tok.pad_id)


def test_checkpoint_with_tokenizer(instruct_dir, tmp_path):
    """save_model(..., tokenizer=) writes a directory that both load_model and load_tokenizer read."""
    tok = load_tokenizer(instruct_dir)
    cfg = ModelConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2)
    model = Qwen2(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    out = save_model(model, tmp_path / "ckpt", tokenizer=tok, generation_config={"eos_token_id": tok.eos_ids})
    again = load_tokenizer(out)
    text = "<|im_start|>user\nSELECT 1<|im_end|>"
    assert again.encode(text) == tok.encode(text) and again.eos_ids == tok.eos_ids
    assert again.vocab_size == tok.vocab_size < load_model(out).config.vocab_size
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["model_max_length"] == 4096


def test_bad_input(tmp_path, instruct_dir):
    with pytest.raises(FileNotFoundError, match="tokenizer.json not found"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match=r"messages\[1\]"):
        load_tokenizer(instruct_dir).apply_chat_template([{"role": "user", "content": "Q"}, {"role": "tool"}])
