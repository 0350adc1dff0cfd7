import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from pipeline.params import EvalSetParams, Params, load_params
from pipeline.strict_yaml import ParamsError, resolve_keys, stage_param_keys
from tests.helpers import REPO


def edit(path: Path, section: str, key: str, value: object) -> None:
    tree = yaml.safe_load(path.read_text())
    tree[section][key] = value
    path.write_text(yaml.safe_dump(tree))


def test_committed_params_are_the_real_run() -> None:
    """A clone runs the real thing: hub ids, not a local folder such as the demo's; remote code
    off; and the demo's values live beside it, never in it."""
    params = load_params(REPO / "params.yaml")
    for source in (params.model.name, params.data.dataset):
        assert not Path(source).is_absolute() and source.count("/") == 1, source
    assert params.model.trust_remote_code is False and params.model.allow_pickle_weights is False
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    demo = yaml.safe_load((REPO / "demo" / "params.yaml").read_text())
    assert any(raw[s][k] != v for s, keys in demo.items() for k, v in keys.items())


def test_dvc_writes_lr_back_as_a_string_and_it_is_read_as_a_float(params_file: Path) -> None:
    # What `dvc exp run -S train.lr=1e-6` leaves in params.yaml.
    text = params_file.read_text().replace("lr: 5e-6", "lr: 1e-06")
    params_file.write_text(text)
    assert yaml.safe_load(text)["train"]["lr"] == "1e-06"  # PyYAML's view: a string
    lr = load_params(params_file).train.lr
    assert isinstance(lr, float) and lr == 1e-6


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("data", "fraction", 0.0, "data.fraction must be in (0, 1]"),
        ("data", "fraction", 1.5, "data.fraction must be in (0, 1]"),
        ("train", "lr", 0, "train.lr must be > 0"),
        ("train", "lr", -1e-5, "train.lr must be > 0"),
        ("train", "lr", "fast", "train.lr must be a number"),
        ("train", "lr", float("nan"), "train.lr must be finite"),
        ("tokenize", "max_length", 8, "tokenize.max_length must be >= 16"),
        ("train", "epochs", 2.5, "train.epochs must be an integer"),
        ("train", "epochs", True, "train.epochs must be an integer"),
        ("model", "trust_remote_code", "yes", "model.trust_remote_code must be true or false"),
        ("train", "device", "tpu", "train.device must be one of"),
        ("tokenize", "template", "Q: {q}", "tokenize.template must contain {question}"),
        ("tokenize", "max_prompt_length", 600, "tokenize.max_prompt_length must be <"),
        ("loss", "variant", "kto", "loss.variant must be one of"),
        ("loss", "beta", 0, "loss.beta must be > 0"),
        ("loss", "label_smoothing", 0.5, "loss.label_smoothing must be in [0, 0.5)"),
        ("loss", "gamma", -1, "loss.gamma must be >= 0"),
        ("loss", "gamma", 0.5, "loss.gamma is SimPO's target margin"),
        ("loss", "sft_weight", -0.1, "loss.sft_weight must be >= 0"),
        ("loss", "reference_free", "no", "loss.reference_free must be true or false"),
    ],
)
def test_bad_values_name_the_key(
    params_file: Path, section: str, key: str, value: object, message: str
) -> None:
    edit(params_file, section, key, value)
    with pytest.raises(ParamsError, match=re.escape(message)):
        load_params(params_file)


def test_unknown_and_missing_keys_are_named(params_file: Path) -> None:
    edit(params_file, "train", "learning_rate", 1e-5)
    with pytest.raises(ParamsError, match="unknown key train.learning_rate"):
        load_params(params_file)
    tree = yaml.safe_load((REPO / "params.yaml").read_text())
    del tree["data"]["seed"]
    params_file.write_text(yaml.safe_dump(tree))
    with pytest.raises(ParamsError, match="missing key data.seed"):
        load_params(params_file)
    tree = yaml.safe_load((REPO / "params.yaml").read_text())
    tree["optimiser"] = {"lr": 1}
    params_file.write_text(yaml.safe_dump(tree))
    with pytest.raises(ParamsError, match="unknown section optimiser"):
        load_params(params_file)


def test_params_are_frozen() -> None:
    params = load_params(REPO / "params.yaml")
    with pytest.raises(AttributeError):
        params.train.lr = 1.0  # type: ignore[misc]


def test_resolved_params_follow_dvc_yaml() -> None:
    """What is saved beside an artifact: the keys its stage reads, nested as in params.yaml."""
    params = load_params(REPO / "params.yaml")
    keys = stage_param_keys("subsample", REPO / "dvc.yaml")
    assert resolve_keys(params, keys) == {
        "data": {k.split(".")[1]: getattr(params.data, k.split(".")[1]) for k in keys}
    }
    trained = resolve_keys(params, stage_param_keys("train", REPO / "dvc.yaml"))
    assert trained["train"]["lr"] == params.train.lr and trained["loss"]["beta"] == params.loss.beta
    assert "tokenize" not in trained  # the data it reads: where its split came from, for MLflow
    assert set(trained["data"]) == {"dataset", "revision", "train_dir", "eval_dir"}
    assert resolve_keys(params, ["eval"])["eval"]["batch_size"] == params.eval.batch_size
    nested = resolve_keys(params, ["train.device", "train.lora.quantize"])
    assert nested == {"train": {"device": "auto", "lora": {"quantize": "none"}}}


def test_demo_overrides_are_valid_params(
    params_file: Path, asset_cache: Path, demo_model_dir: Path, demo_dataset_dir: Path
) -> None:
    """The demo points model.name and data.dataset at its local folders, as a user would."""
    from demo.experiment import demo_overrides
    from tests.helpers import apply_overrides

    apply_overrides(params_file, demo_overrides(REPO / "demo" / "params.yaml", asset_cache))
    params = load_params(params_file)
    assert params.model.name == str(demo_model_dir.resolve())
    assert params.data.dataset == str(demo_dataset_dir.resolve())
    assert params.train.lr == 1e-3


def test_loss_settings_a_variant_would_ignore_are_errors(params_file: Path) -> None:
    edit(params_file, "loss", "variant", "hinge")
    edit(params_file, "loss", "label_smoothing", 0.1)
    with pytest.raises(ParamsError, match=re.escape("loss.label_smoothing applies to")):
        load_params(params_file)
    edit(params_file, "loss", "label_smoothing", 0.0)
    edit(params_file, "loss", "variant", "simpo")
    with pytest.raises(ParamsError, match="loss.variant simpo is reference-free"):
        load_params(params_file)
    edit(params_file, "loss", "reference_free", True)
    edit(params_file, "loss", "gamma", 0.5)
    loss = load_params(params_file).loss
    assert (loss.variant, loss.gamma, loss.reference_free) == ("simpo", 0.5, True)


def test_a_4bit_base_needs_adapters_and_is_not_sharded(params_file: Path) -> None:
    def set_lora(**values: object) -> None:
        tree = yaml.safe_load(params_file.read_text())
        tree["train"]["lora"].update(values)
        params_file.write_text(yaml.safe_dump(tree))

    set_lora(quantize="int4")
    with pytest.raises(ParamsError, match=re.escape("train.lora.quantize must be one of")):
        load_params(params_file)
    set_lora(quantize="nf4")
    with pytest.raises(ParamsError, match=re.escape("needs train.lora.enabled: true")):
        load_params(params_file)
    set_lora(enabled=True)
    assert load_params(params_file).train.lora.quantize == "nf4"
    edit(params_file, "train", "nproc", 2)
    edit(params_file, "train", "parallel", "fsdp")
    with pytest.raises(ParamsError, match=re.escape("with train.parallel: fsdp is not supported")):
        load_params(params_file)


def test_a_failed_experiments_leftovers_are_set_back_for_the_demo() -> None:
    from demo.experiment import committed_values_back

    committed = {"train": {"beta": 0.1, "lr": 5e-6, "seed": 42}, "data": {"seed": 42}}
    workspace = {"train": {"beta": 0.5, "lr": "abc", "seed": 42}, "data": {"seed": 42}}
    # train.lr is the user's own -S here: it is theirs to set; beta goes back to the commit.
    assert committed_values_back(workspace, committed, {"train.lr"}) == {"train.beta": 0.1}
    assert committed_values_back(committed, committed, set()) == {}


def test_the_demo_checks_its_overrides_before_dvc_sees_them() -> None:
    """A typo'd or out-of-range `-S` gets the project's own error, naming the key; the demo's
    own overrides, the SmolLM2 route's included, pass."""
    from demo.experiment import checked
    from pipeline.strict_yaml import flatten

    assert checked({"train.lrr": 1e-4}, REPO / "params.yaml").startswith("unknown key train.lrr")
    assert checked({"train.lr": -1}, REPO / "params.yaml") == "train.lr must be > 0, got -1"
    for name in ("params.yaml", "smollm2.yaml"):
        demo = flatten(yaml.safe_load((REPO / "demo" / name).read_text()))
        assert checked(demo, REPO / "params.yaml") is None, name


KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>\w+):(?P<rest>.*)$")


def key_comments(text: str) -> dict[str, str]:
    """Each dotted key of a params.yaml text -> what its comments say: the one at the end of its
    line, else the comment lines right above it."""
    found: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    above: list[str] = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            above.append(line.strip().lstrip("#").strip())
            continue
        match = KEY_LINE.match(line)
        if match is None:
            above = []
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = ".".join([*(name for _, name in stack), match["key"]])
        trailing = re.search(r"\s#\s(.*)$", match["rest"])
        found[key] = trailing.group(1) if trailing else " ".join(above)
        stack.append((indent, match["key"]))
        above = []
    return found


def field_keys(cls: type, prefix: str = "") -> list[str]:
    """The dotted keys of a params dataclass, nested sections and their keys both."""
    keys = []
    for name, hint in typing.get_type_hints(cls).items():
        keys.append(prefix + name)
        if dataclasses.is_dataclass(hint):
            keys += field_keys(hint, f"{prefix}{name}.")
    return keys


def test_every_key_is_documented_once_beside_it_in_params_yaml() -> None:
    comments = key_comments((REPO / "params.yaml").read_text(encoding="utf-8"))
    sections = typing.get_type_hints(Params)
    keys = [k for name, cls in sections.items() for k in field_keys(cls, f"{name}.")]
    assert [k for k in keys if not comments.get(k)] == []
    # The items of eval.datasets have no line of their own: its comment names each of their keys.
    words = set(re.findall(r"\w+", comments["eval.datasets"]))
    assert [f.name for f in dataclasses.fields(EvalSetParams) if f.name not in words] == []
    # And pipeline/params.py says nothing of its own about a key: no comment above a field.
    source = (REPO / "pipeline" / "params.py").read_text(encoding="utf-8").splitlines()
    field = re.compile(r"^    \w+: ")
    described = [
        line for n, line in enumerate(source) if field.match(line) and "#" in source[n - 1]
    ]
    assert described == []


def test_a_key_without_a_comment_is_found() -> None:
    text = "train:\n  # peak rate\n  lr: 1\n  epochs: 3   # passes\n  seed: 4\nloss:\n  beta: 1\n"
    assert key_comments(text) == {
        "train": "",
        "train.lr": "peak rate",
        "train.epochs": "passes",
        "train.seed": "",
        "loss": "",
        "loss.beta": "",
    }
