"""Training data: user files (JSONL/Parquet) and the built-in task and preference sets."""
