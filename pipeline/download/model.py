"""Fetch the base model into a plain Hugging Face folder (config, safetensors, tokenizer).

A hub id is first snapshotted (only the files a causal LM needs); a local folder is used as is.
From there both take the same path: refuse remote code and pickle weights unless params allow
them, check the folder loads, copy it into place.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from huggingface_hub import snapshot_download
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pipeline.download.hub import local_folder, reaching_the_hub
from pipeline.model.scoring import check_architecture
from pipeline.params import ModelParams

# What a causal LM folder needs; anything else in a hub repo (ONNX, GGUF, images) is skipped.
MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
PICKLE_FILES = ["*.bin", "*.pt", "*.pth"]


def resolve_model_dir(params: ModelParams, key: str = "model.name") -> Path:
    """A local folder holding the model named by `params.name` (set by params key `key`)."""
    local = local_folder(key, params.name, "a model folder")
    if local is not None:
        return local
    patterns = MODEL_FILES + (PICKLE_FILES if params.allow_pickle_weights else [])
    with reaching_the_hub(key, params.name):
        return Path(
            snapshot_download(params.name, revision=params.revision, allow_patterns=patterns)
        )


def check_model_dir(source: Path, params: ModelParams) -> None:
    """Refuse what params do not allow: custom code, pickle-only weights, a missing config."""
    config_path = source / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{source}: no config.json, not a Hugging Face model folder")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if "auto_map" in config and not params.trust_remote_code:
        raise ValueError(
            f"{source}: the model ships its own code (auto_map in config.json); set "
            "model.trust_remote_code: true only if you trust it"
        )
    if not any(source.glob("*.safetensors")):
        if not any(p for pattern in PICKLE_FILES for p in source.glob(pattern)):
            raise FileNotFoundError(f"{source}: no weights (*.safetensors) found")
        if not params.allow_pickle_weights:
            raise ValueError(
                f"{source}: only pickle weights (*.bin), which can run code when loaded; set "
                "model.allow_pickle_weights: true to convert them to safetensors"
            )


def fetch_model(params: ModelParams, out_dir: Path, key: str = "model.name") -> Path:
    """download stage, model half: out_dir with safetensors weights and the tokenizer. (The
    reward stage fetches `judge.model` with it too: `key` names the setting in messages.)

    Writes into `out_dir` directly; the stage wraps it in atomic_dir.
    """
    source = resolve_model_dir(params, key)
    check_model_dir(source, params)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(source.glob("*.safetensors")):
        for pattern in MODEL_FILES:
            for path in source.glob(pattern):
                shutil.copy2(path, out_dir / path.name)
    else:
        _convert_pickle(source, out_dir, params)
    _check_loads(out_dir, params)
    return out_dir


def _convert_pickle(source: Path, dest: Path, params: ModelParams) -> None:
    """Load allowed pickle weights once and save them as safetensors (never pickle downstream)."""
    model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=params.trust_remote_code)
    model.save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(
        source, trust_remote_code=params.trust_remote_code
    ).save_pretrained(dest)


def _check_loads(folder: Path, params: ModelParams) -> None:
    """Config and tokenizer load, the tokenizer has the EOS token completions end with, and the
    scorer serves the architecture (checked on a miniature: no weights are read here)."""
    config = AutoConfig.from_pretrained(folder, trust_remote_code=params.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=params.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{params.name}: the tokenizer has no EOS token to end completions with")
    check_architecture(config, params.trust_remote_code)
