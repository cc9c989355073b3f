"""Exported checkpoints run correctly in other tools: what the source model's config.json holds beyond the network
and its generation_config.json travel through load -> train -> save (run.save_checkpoint + promote_final, as
train.py saves), and transformers' greedy `generate` on the result stops where our sampler stops, token for token."""

import json

import pytest
import torch

from sqlr1.checkpoint import config_to_hf, load_model, save_model, save_state_dict, source_extras
from sqlr1.distributed import Dist
from sqlr1.model import ModelConfig, Qwen2
from sqlr1.run import promote_final, save_checkpoint
from sqlr1.sampling import SamplingParams, generate
from sqlr1.tokenizer import load_tokenizer
from tests.test_tokenizer import SPECIALS, write_tokenizer

transformers = pytest.importorskip("transformers")

PROMPT = "How many singers do we have?"
RESPONSE = " SELECT count(*) FROM singer"


def qwen_like_extras(ids: dict[str, int]) -> tuple[dict, dict]:
    """(config.json keys ModelConfig does not model, generation_config.json) laid out like Qwen2.5-Instruct's."""
    config = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
              "transformers_version": "4.43.1", "sqlr1_test_note": {"kept": [1, "verbatim"]}}
    generation = {"bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"], "do_sample": True,
                  "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "repetition_penalty": 1.05,
                  "temperature": 0.7, "top_p": 0.8, "top_k": 20, "transformers_version": "4.37.0"}
    return config, generation


def make_source(d, qwen_like: bool):
    """A tiny random Qwen2 with a ChatML tokenizer (vocabulary padded past the tokenizer, as Qwen's); with
    `qwen_like`, Qwen2.5-Instruct's extra config.json keys (and a stale torch_dtype) and generation_config.json,
    else none of them (the fallback: a generation config built from the tokenizer)."""
    tok_dir = write_tokenizer(d / "tok", tokenizer_config={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    tok = load_tokenizer(tok_dir)
    config = ModelConfig(vocab_size=tok.vocab_size + 13, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=1e4)
    model = Qwen2(config)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    src = save_model(model, d / "source")
    tok.save(src)
    if qwen_like:
        extra, generation = qwen_like_extras({t: tok.token_to_id(t) for t in SPECIALS})
        hf = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**hf, **extra, "torch_dtype": "float16", "dtype": "float16"}))
        (src / "generation_config.json").write_text(json.dumps(generation))
    return src


def prompt_ids(tok) -> list[int]:
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]))


def train_to_answer(model, tok, steps: int = 60):
    """A few AdamW steps of cross-entropy on one ChatML exchange ending in <|im_end|>: the model learns to stop."""
    prompt = prompt_ids(tok)
    ids = torch.tensor([prompt + tok.encode(RESPONSE) + [tok.token_to_id("<|im_end|>")]])
    labels = ids[0, 1:].clone()
    labels[: len(prompt) - 1] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1])[0], labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


@pytest.mark.parametrize("qwen_like", [True, False], ids=["source-generation-config", "none-built-from-tokenizer"])
def test_round_trip_keeps_source_extras_and_transformers_stops_where_we_stop(tmp_path, qwen_like):
    src = make_source(tmp_path, qwen_like)
    tok = load_tokenizer(src)
    extras = source_extras(src)  # read once at the start, as train.py does
    policy = load_model(src, dtype=torch.float32)
    opt = train_to_answer(policy, tok)
    run = tmp_path / "run"
    ckpt = save_checkpoint(run, 60, policy, opt, {"step": 60}, tok, Dist(), torch.bfloat16, source=extras)
    promote_final(ckpt / "model", run / "final")
    final = run / "final"

    saved = json.loads((final / "config.json").read_text())
    generation = json.loads((final / "generation_config.json").read_text())
    assert saved["torch_dtype"] == "bfloat16"  # what was saved, not the source's stale "float16"
    assert {k: saved[k] for k in config_to_hf(ModelConfig())} == config_to_hf(policy.config)
    if qwen_like:
        extra, source_generation = qwen_like_extras({t: tok.token_to_id(t) for t in SPECIALS})
        assert {k: saved[k] for k in extra} == extra
        assert generation == source_generation
        greedy = {"do_sample": False, "repetition_penalty": 1.0}  # Qwen's sampling defaults are carried: greedy here
    else:
        assert generation == {"eos_token_id": tok.eos_ids, "pad_token_id": tok.pad_id}
        greedy = {}  # the built config is plain greedy decoding

    ours_tok = load_tokenizer(final)
    ours = generate(load_model(final, dtype=torch.float32), [prompt_ids(ours_tok)], 1,
                    SamplingParams(24, 0.0, stop_ids=ours_tok.eos_ids, vocab_size=ours_tok.vocab_size), progress=False)
    assert ours.finish_reason == ["stop"] and ours_tok.decode(ours.tokens[0]) == RESPONSE + "<|im_end|>"
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    prompt = torch.tensor([prompt_ids(ours_tok)])
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, **greedy)
    assert out[0, prompt.shape[1]:].tolist() == ours.tokens[0]


def test_model_config_keys_win_over_stale_source_values(tmp_path):
    """A key we model that changed since the source is written from the ModelConfig; the others stay verbatim."""
    src = make_source(tmp_path, qwen_like=True)
    extras = source_extras(src)
    assert "vocab_size" not in extras.config and "rope_parameters" not in extras.config
    model = load_model(src, dtype=torch.float32)
    longer = ModelConfig(**{**vars(model.config), "max_position_embeddings": 256})
    out = save_state_dict(model.state_dict(), longer, tmp_path / "longer", source=extras)
    saved = json.loads((out / "config.json").read_text())
    assert saved["max_position_embeddings"] == 256 and saved["torch_dtype"] == "float32"
    assert saved["transformers_version"] == "4.43.1"
    assert json.loads((out / "generation_config.json").read_text()) == extras.generation_config
