"""The offline CPU demo: the real DAG with the keys of demo/params.yaml overridden, and
model.name / data.dataset pointing at the demo's model and pairs, built as local folders.

`python -m demo` runs it as a DVC experiment in a temporary copy (`dvc exp run --temp`),
so params.yaml keeps the real defaults and `dvc exp show` lists the demo beside real runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from demo import asset_cache_dir
from demo.dataset import MODEL_FOLDER, ensure_demo_dataset, ensure_other_dataset
from pipeline.stage_io import INTERRUPTED_EXIT
from pipeline.stopping import run_to_the_end
from pipeline.strict_yaml import flatten

DEMO_PARAMS = Path("demo/params.yaml")


# --model: the demo's tiny Qwen3, or a real pretrained model with the keys of its own file
# on top of demo/params.yaml.
MODELS = {"tiny": None, "smollm2": Path("demo/smollm2.yaml")}
OTHER_EVAL_SIZE = 150  # pairs of the extra held-out set (whole questions: a few more)
OTHER_JUDGED = 16  # of its questions, answered by the base model and the policy (judge_sets)


def demo_overrides(
    path: Path = DEMO_PARAMS, cache_dir: Path | None = None, model: str = "tiny"
) -> dict[str, Any]:
    """The demo's overrides as dotted keys: demo/params.yaml (then the model's own file, for a
    real model), and model.name and data.dataset pointing at the demo's local folders (built
    into the asset cache on first use)."""
    overrides = flatten(yaml.safe_load(path.read_text(encoding="utf-8")))
    if MODELS[model] is not None:
        own = path.parent / MODELS[model].name
        overrides.update(flatten(yaml.safe_load(own.read_text(encoding="utf-8"))))
    sources = demo_sources(Path(cache_dir or asset_cache_dir()).resolve(), model)
    return {**overrides, **sources}


def demo_sources(cache_dir: Path, model: str = "tiny") -> dict[str, Any]:
    """The model and the generated pairs as ordinary local folders: the download stages treat
    them as they treat any local model or dataset folder. The tiny model's runs also score an
    extra held-out set of new questions in TRL's conversational format (eval.datasets)."""
    sources: dict[str, Any] = {
        "model.name": str(model_folder(cache_dir, model)),
        "data.dataset": str(ensure_demo_dataset(cache_dir)),
    }
    if model == "tiny":
        other = {"name": "other", "dataset": str(ensure_other_dataset(cache_dir)), "split": "test"}
        sources["eval.datasets"] = [{**other, "size": OTHER_EVAL_SIZE, "judge": OTHER_JUDGED}]
    return sources


def model_folder(cache_dir: Path, model: str) -> Path:
    """The tiny Qwen3 or SmolLM2-135M-Instruct, built on first use (torch imported only then)."""
    if model == "smollm2":
        from demo.real_assets import ensure_smollm2

        return ensure_smollm2(cache_dir)
    folder = cache_dir / MODEL_FOLDER
    if not (folder / "config.json").is_file():
        from demo.model import ensure_demo_model

        ensure_demo_model(cache_dir)
    return folder


def set_flags(overrides: Mapping[str, Any]) -> list[str]:
    """`dvc exp run` flags: -S key=value, values in YAML spelling (so true stays a bool)."""
    flags = []
    for key, value in overrides.items():
        flags += [
            "-S",
            f"{key}={yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()}",
        ]
        flags[-1] = flags[-1].removesuffix("\n...")
    return flags


def committed_params(path: Path = Path("params.yaml")) -> dict[str, Any] | None:
    """The params file as committed at HEAD; None outside a git checkout or without a commit."""
    done = subprocess.run(
        ["git", "show", f"HEAD:{path.as_posix()}"], capture_output=True, text=True, check=False
    )
    return yaml.safe_load(done.stdout) if done.returncode == 0 else None


def committed_values_back(
    workspace: Mapping[str, Any], committed: Mapping[str, Any], keep: set[str]
) -> dict[str, Any]:
    """Dotted keys whose workspace value differs from the committed one, with the committed value.

    A failed `dvc exp run -S loss.beta=0.5` leaves `beta: 0.5` in params.yaml, and a demo run
    copies the workspace: without these, the next demo would record values nobody asked for.
    Keys in `keep` (the demo's and the user's own overrides) are left to those.
    """
    now, then = flatten(workspace), flatten(committed)
    return {key: value for key, value in then.items() if now.get(key) != value and key not in keep}


COOPERATIVE_SHELLS = ("bash", "zsh")


def venv_env() -> dict[str, str]:
    """Environment where dvc.yaml's `python` is this interpreter (the project's venv), run by a
    shell that lets a Ctrl-C reach the stage and end it with the stage's own exit status.

    DVC runs each stage command as `$SHELL -c CMD` (/bin/sh when SHELL is unset). bash and zsh
    wait for an interrupted command and exit as it did: 130, after the stage's `interrupted:`
    line. dash, Debian's /bin/sh, dies of the SIGINT at once, so DVC reports "exited with -2"
    while the stage is still closing its MLflow run.
    """
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if Path(env.get("SHELL", "/bin/sh")).name not in COOPERATIVE_SHELLS:
        bash = shutil.which("bash")
        if bash is not None:
            env["SHELL"] = bash
    return env


def registered_line(name: str) -> str | None:
    """What the register stage said about experiment `name` (from the experiment's commit)."""
    refs = subprocess.run(
        ["git", "for-each-ref", "--format=%(refname)", "refs/exps"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    ref = next((r for r in refs if r.rsplit("/", 1)[-1] == name), None)
    if ref is None:
        return None
    shown = subprocess.run(
        ["git", "show", f"{ref}:registry/registered.json"],
        capture_output=True,
        text=True,
        check=False,
    )
    return json.loads(shown.stdout).get("summary") if shown.returncode == 0 else None


def where_next(name: str) -> str:
    """The lines a finished demo ends with: the registry's verdict, then where the figures are."""
    store = os.environ.get("MLFLOW_TRACKING_URI")
    browse = f"open {store}" if store else f"mlflow ui {MLFLOW_UI}"
    lines = [
        f"{name}: {registered_line(name) or 'no registry verdict found'}",
        f"compare the experiments:  {COMPARE}",
        f"browse runs and models:   {browse}",
    ]
    return "\n".join(lines)


# What a user types next; the README gives the same commands.
COMPARE = "python -m pipeline.compare"
MLFLOW_UI = "--backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--name", help="experiment name (default: demo-<date>-<time>; queued: DVC picks one)"
    )
    parser.add_argument(
        "--set",
        "-S",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra override on top of demo/params.yaml (repeatable)",
    )
    parser.add_argument(
        "--queue",
        action="store_true",
        help="queue the experiment (run the queue with `dvc queue start -j N`) instead of now",
    )
    parser.add_argument(
        "--model",
        choices=list(MODELS),
        default="tiny",
        help="tiny: the seeded 221k-weight Qwen3 (minutes); smollm2: SmolLM2-135M-Instruct, a "
        "real pretrained model, with LoRA and its chat template (demo/smollm2.yaml)",
    )
    parser.add_argument("target", nargs="?", help="stage to run up to (default: all)")
    return parser.parse_args(argv)


def overrides_for(explicit: set[str], model: str = "tiny") -> dict[str, Any]:
    """demo/params.yaml (and the model's own file), plus the committed value of any key a
    failed `dvc exp run` left changed in params.yaml (the demo copies the workspace);
    `explicit` keys are the user's."""
    overrides = demo_overrides(model=model)
    committed = committed_params()
    if committed is None:
        return overrides
    workspace = yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8"))
    back = committed_values_back(workspace, committed, set(overrides) | explicit)
    if back:
        changed = ", ".join(f"{k}: {flatten(workspace).get(k)!r}" for k in back)
        print(
            f"params.yaml has uncommitted changes ({changed}; left by a failed `dvc exp "
            "run`?): the demo uses the committed values. `git checkout params.yaml` "
            "discards them.",
            file=sys.stderr,
        )
    return {**back, **overrides}


def checked(overrides: Mapping[str, Any], path: Path = Path("params.yaml")) -> str | None:
    """The project's own error for params.yaml with `overrides` (dotted keys) applied, as the
    stages will read it, or None: a typo'd `-S` key gets it before DVC, whose first word would
    be to append the typo (`+train.lrr`)."""
    from pipeline.params import load_params
    from pipeline.strict_yaml import ParamsError

    tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node[leaf] = value
    with tempfile.TemporaryDirectory() as scratch:
        candidate = Path(scratch) / "params.yaml"
        candidate.write_text(yaml.safe_dump(tree), encoding="utf-8")
        try:
            load_params(candidate)
        except ParamsError as error:
            return str(error).replace(str(candidate), "params.yaml")
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    explicit = {extra.split("=", 1)[0] for extra in args.set}
    overrides = {k: v for k, v in overrides_for(explicit, args.model).items() if k not in explicit}
    users = dict(extra.split("=", 1) for extra in args.set if "=" in extra)
    error = checked({**overrides, **{k: yaml.safe_load(v) for k, v in users.items()}})
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 1
    # A run now gets a dated name (its summary is looked up by name); a queued one without a
    # name gets DVC's own, so two lines queued within one second do not collide.
    prefix = "demo" if args.model == "tiny" else args.model
    name = args.name or (None if args.queue else time.strftime(f"{prefix}-%Y%m%d-%H%M%S"))
    mode = "--queue" if args.queue else "--temp"
    dvc_args = ["exp", "run", mode, *set_flags(overrides)]
    for extra in args.set:
        dvc_args += ["-S", extra]
    dvc_args += [*(["-n", name] if name else []), *([args.target] if args.target else [])]
    print("+ dvc", " ".join(dvc_args), flush=True)
    cmd = [sys.executable, "-m", "demo.dvc_cli", *dvc_args]
    status, interrupted = run_to_the_end(cmd, venv_env())
    if interrupted:
        return INTERRUPTED_EXIT
    if status != 0:
        return 1  # DVC and the failing stage have said why
    if args.queue:
        queued = f"queued {name}" if name else "queued"
        print(f"{queued}: `dvc queue start` runs the queue, `dvc queue status` shows it")
    elif not args.target:
        print(where_next(name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
