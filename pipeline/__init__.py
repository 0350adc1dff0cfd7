"""DPO fine-tuning of Qwen3 as a DVC pipeline: the library behind the stages in stages/."""
