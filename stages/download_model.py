"""download_model: params model.* -> models/base/ (config, safetensors, tokenizer)."""

from pipeline.download.model import fetch_model
from pipeline.params import load_params, save_resolved
from pipeline.stage_io import MODEL_BASE, atomic_dir, run_stage


def main() -> None:
    params = load_params()
    with atomic_dir(MODEL_BASE) as tmp:
        fetch_model(params.model, tmp)
        save_resolved(params, tmp, "download_model")
    print(f"model {params.model.name} -> {MODEL_BASE}")


if __name__ == "__main__":
    run_stage(main)
