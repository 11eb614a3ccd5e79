"""The instruments: per-row scores, batched greedy generation, token losses, MMLU accuracy and the
official LUME numbers computed from them, for a model already in memory (no files)."""
