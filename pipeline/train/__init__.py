"""The DPO training loop, its batch plan, checkpoints and data parallelism."""
