"""The tokenizer: tokenizer.json (byte-level BPE for Qwen2.5), ChatML prompts, and the ids that end a response.

Qwen2.5's chat format (ChatML), which SQL-R1 prompts use with the assistant turn pre-filled with "<think>":

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n<think>

Two numbers the sampler needs come from here: `vocab_size`, the real number of token ids (151,665 for Qwen2.5,
fewer than the 152,064 embedding rows: ids >= vocab_size must never be sampled), and `eos_ids`, the ids that stop
a response (Qwen2.5-Instruct ends a turn with <|im_end|> and may also emit <|endoftext|>).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from sqlr1.hub import resolve_checkpoint

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
_ROLES = ("system", "user", "assistant")


def _token_text(token) -> str | None:
    """tokenizer_config.json writes special tokens as "text" or {"content": "text", ...}."""
    return token.get("content") if isinstance(token, dict) else token


def _read_json_object(path: Path) -> dict:
    """The JSON object in `path` ({} if the file is absent), or a ValueError that names the file."""
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(content).__name__}")
    return content


class Tokenizer:
    """tokenizer.json plus the settings of tokenizer_config.json / generation_config.json in `directory`."""

    def __init__(self, directory: str | os.PathLike):
        d = Path(directory)
        tokenizer_file = d / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{tokenizer_file} not found: the model directory needs a fast-tokenizer file")
        try:
            self._tok = _HFTokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the tokenizers library raises a bare Exception for a malformed file
            raise ValueError(f"{tokenizer_file}: not a readable tokenizer file ({e})") from None
        self.config: dict = _read_json_object(d / "tokenizer_config.json")
        generation = _read_json_object(d / "generation_config.json")

        # Ids are 0..vocab_size-1 (max id + 1 also covers added tokens placed after a gap).
        self.vocab_size: int = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        eos = generation.get("eos_token_id", [])
        eos_ids = [i for i in (eos if isinstance(eos, list) else [eos]) if isinstance(i, int)]  # null: none given
        for text in (_token_text(self.config.get("eos_token")), *STOP_TOKENS):
            tid = self.token_to_id(text) if text else None
            if tid is not None:
                eos_ids.append(tid)
        self.eos_ids: list[int] = list(dict.fromkeys(eos_ids))
        if not self.eos_ids:
            raise ValueError(f"{d}: no stop token found (no eos_token, eos_token_id, <|im_end|> or <|endoftext|>)")
        pad_text = _token_text(self.config.get("pad_token")) or "<|endoftext|>"
        pad_id = self.token_to_id(pad_text)
        self.pad_id: int = pad_id if pad_id is not None else self.eos_ids[0]
        self.default_system: str | None = self.config.get("sqlr1_default_system", QWEN_DEFAULT_SYSTEM)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, nothing added; special tokens written in the text ("<|im_start|>") map to their ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, assistant_prefix: str = ""
    ) -> str:
        """ChatML text of a conversation, as Qwen2.5's chat template renders plain-text messages (no tools).

        A conversation that does not open with a system message gets `default_system` (Qwen's, unless
        tokenizer_config.json sets "sqlr1_default_system"; None: no system turn). With `add_generation_prompt` the
        text ends with an open assistant turn followed by `assistant_prefix` (SQL-R1 pre-fills "<think>").
        """
        for i, m in enumerate(messages):
            if m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                raise ValueError(
                    f"messages[{i}]: expected {{'role': one of {_ROLES}, 'content': str}}, got {m!r:.80}"
                )
        turns = [(m["role"], m["content"]) for m in messages]
        if (not turns or turns[0][0] != "system") and self.default_system is not None:
            turns.insert(0, ("system", self.default_system))
        text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
        if add_generation_prompt:
            text += "<|im_start|>assistant\n" + assistant_prefix
        return text

    def save(self, out_dir: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json (with this tokenizer's eos/pad/default system) to out_dir."""
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(d / "tokenizer.json"))
        config = dict(self.config)
        config.setdefault("eos_token", self._tok.id_to_token(self.eos_ids[0]))
        config.setdefault("pad_token", self._tok.id_to_token(self.pad_id))
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config.pop("sqlr1_default_system", None)
        if self.default_system != QWEN_DEFAULT_SYSTEM:
            config["sqlr1_default_system"] = self.default_system
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def load_tokenizer(path_or_repo_id: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a local checkpoint directory or Hub repo id."""
    return Tokenizer(resolve_checkpoint(path_or_repo_id))
