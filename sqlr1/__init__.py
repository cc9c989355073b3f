"""sqlr1: SQL-R1 (NL2SQL reasoning via GRPO on execution rewards) in plain PyTorch."""

from sqlr1.checkpoint import load_model, save_model
from sqlr1.tokenizer import load_tokenizer

__all__ = ["load_model", "save_model", "load_tokenizer"]
