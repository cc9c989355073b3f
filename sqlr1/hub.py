"""Where a model directory comes from: a local path, or a Hugging Face Hub repo id downloaded to the local cache.

Shared by checkpoint.py (weights) and tokenizer.py (tokenizer files), which both accept "a directory or a repo id".
"""

from __future__ import annotations

import os
from pathlib import Path

# Everything a Qwen2 checkpoint needs to load here; no *.bin / *.pth / *.gguf duplicates of the weights.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "merges.txt", "vocab.json"]


def resolve_checkpoint(path_or_repo_id: str | os.PathLike) -> Path:
    """A local directory as is; anything else is taken as a Hub repo id and downloaded (or found in the HF cache)."""
    text = str(path_or_repo_id)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{text} is a file; pass the checkpoint directory that holds config.json")
    # A repo id is "name" or "org/name"; anything else that is not on disk was meant as a local path.
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or (os.sep != "/" and os.sep in text):
        raise FileNotFoundError(f"checkpoint directory {text} does not exist")
    from huggingface_hub import snapshot_download  # only when a download is really needed

    try:
        return Path(snapshot_download(text, allow_patterns=HUB_PATTERNS))
    except (OSError, ValueError) as e:  # offline, not cached, unknown/gated repo, invalid repo id
        raise FileNotFoundError(
            f"{text!r} is neither a local directory nor a reachable Hugging Face repo ({type(e).__name__}); download "
            f"it where the Hub is reachable, e.g. `hf download {text} --local-dir DIR` (older huggingface_hub: "
            "`huggingface-cli download`), then pass DIR"
        ) from None
