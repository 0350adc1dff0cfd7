"""The offline CPU demo: the real DAG with the keys of demo/params.yaml overridden.

`python -m pipeline.demo` runs it as a DVC experiment in a temporary copy (`dvc exp run --temp`),
so params.yaml keeps the real defaults and `dvc exp show` lists the demo beside real runs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

DEMO_PARAMS = Path("demo/params.yaml")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def demo_overrides(path: Path = DEMO_PARAMS) -> dict[str, Any]:
    """The demo's overrides as dotted keys."""
    return flatten(yaml.safe_load(path.read_text(encoding="utf-8")))


def set_flags(overrides: Mapping[str, Any]) -> list[str]:
    """`dvc exp run` flags: -S key=value, values in YAML spelling (so true stays a bool)."""
    flags = []
    for key, value in overrides.items():
        flags += ["-S", f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"]
        flags[-1] = flags[-1].removesuffix("\n...")
    return flags


def apply_overrides(params_file: Path, overrides: Mapping[str, Any]) -> None:
    """Write the overrides into a params file (for a throwaway copy of the repository)."""
    tree = yaml.safe_load(params_file.read_text(encoding="utf-8"))
    for key, value in overrides.items():
        *path, name = key.split(".")
        node = tree
        for part in path:  # nested sections too: train.lora.enabled
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or name not in node:
            raise KeyError(f"demo override {key} is not a key of {params_file}")
        node[name] = value
    params_file.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")


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

    A failed `dvc exp run -S train.beta=0.5` leaves `beta: 0.5` in params.yaml, and a demo run
    copies the workspace: without these, the next demo would record values nobody asked for.
    Keys in `keep` (the demo's and the user's own overrides) are left to those.
    """
    now, then = flatten(workspace), flatten(committed)
    return {key: value for key, value in then.items() if now.get(key) != value and key not in keep}


def venv_env() -> dict[str, str]:
    """Environment where dvc.yaml's `python` is this interpreter (the project's venv)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", help="experiment name shown by `dvc exp show`")
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
    parser.add_argument("target", nargs="?", help="stage to run up to (default: all)")
    args = parser.parse_args(argv)
    overrides = demo_overrides()
    explicit = {extra.split("=", 1)[0] for extra in args.set}
    committed = committed_params()
    if committed is not None:
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
        overrides = {**back, **overrides}
    mode = "--queue" if args.queue else "--temp"
    cmd = [sys.executable, "-m", "dvc", "exp", "run", mode, *set_flags(overrides)]
    for extra in args.set:
        cmd += ["-S", extra]
    cmd += ["-n", args.name] if args.name else []
    cmd += [args.target] if args.target else []
    print("+", " ".join(cmd[1:]), flush=True)
    return subprocess.call(cmd, env=venv_env())


if __name__ == "__main__":
    raise SystemExit(main())
