"""sqlr1: SQL-R1 (NL2SQL reasoning via GRPO on execution rewards) in plain PyTorch."""
