"""The offline demo: generated pairs, a tiny Qwen3 and the command that runs the DAG on them."""
