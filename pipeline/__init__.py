"""DPO fine-tuning of Qwen3 as a DVC pipeline: the library behind the stages in stages/."""

import logging

# bitsandbytes (the qlora extra), imported by peft whenever it is installed, warns on every
# import on CPUs with AVX512-BF16 that an optional CPU 4-bit inference kernel ("kernels"
# package) is missing. 4-bit training here runs on CUDA only, so that kernel is never used: the
# warning would only add a confusing first line to every stage's output.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
