"""lm-evaluation-harness task definitions (YAML) that read a local jsonl instead of the hub."""
