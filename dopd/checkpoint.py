"""One checkpoint format for both runners, written so that a crash while saving never costs the run.

A checkpoint is a directory `checkpoints/step_NNNNNNN/`:
  drafter/           the learner's weights (a dopd drafter directory: config.json + model.safetensors)
  learner.pt         the full optimizer state per named parameter, the schedule, every rank's RNGs and data position
  records.msgpack    rollout records produced but not trained yet (a synchronous round in progress)
  state.json         the run's own state (dopd/train.py `RunState`: step, policy version, FLOPs, clocks, evaluations,
                     the runner's accounts)
  manifest.json      every file above with its size and SHA-256; written last
Nothing in it depends on the runner or on the number of learner ranks, so either runner resumes it.

Writing: into `step_N.tmp/`, every file fsynced, the manifest last, then renamed to `step_N/`; then `latest` is
replaced atomically (a temporary file renamed over it) to name it; then all but the newest `KEEP` checkpoints go.
Resuming (`find`): the checkpoint `latest` names is verified against its manifest; if it (or `latest` itself) is
damaged, the newest checkpoint that verifies is used instead, with a message naming both, and the damaged one is
moved aside (`step_N.damaged`) so that it is never the one kept. A directory without a manifest (another format) is
reported, never moved.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgpack
import torch

from dopd.common.drafters import write_drafter
from dopd.common.errors import DopdError

FORMAT = 1
KEEP = 2
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class Checkpoint:
    path: Path
    # the learner state without the optimizer's moments (learner.opd_optimizer=fresh): a new phase starts from zero
    fresh_optimizer: bool = False

    @property
    def step(self) -> int:
        return int(self.state()["run"]["step"])

    @property
    def drafter(self) -> Path:
        return self.path / "drafter"

    def state(self) -> dict:
        return json.loads((self.path / "state.json").read_text())

    def learner(self) -> dict:
        state = torch.load(self.path / "learner.pt", weights_only=False)
        return without_moments(state) if self.fresh_optimizer else state

    def weights(self) -> dict:
        from safetensors.torch import load_file

        return load_file(str(self.drafter / "model.safetensors"))

    def records(self) -> list[bytes]:
        return list(msgpack.unpackb((self.path / "records.msgpack").read_bytes(), raw=False))


def without_moments(state: dict) -> dict:
    """A learner state (learner.pt) whose AdamW moments and step counts are zero, as a freshly built optimizer's
    are after its first step creates them; the schedule (learning rates, scheduler position), weights, RNGs and data
    position are kept. Both engines load it as they load any state (per named parameter)."""
    opt = state.get("optimizer")
    if opt is None:
        return state
    params = {n: {k: torch.zeros_like(v) for k, v in st.items()} for n, st in opt["params"].items()}
    return {**state, "optimizer": {**opt, "params": params}}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != "manifest.json")


def write(root: Path, step: int, spec: dict, weights: dict, learner: dict, records: list[bytes], state: dict) -> Path:
    """Write checkpoint `step` under `root` (the run's checkpoints/ directory); returns its path."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f"step_{step:07d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write_drafter(tmp / "drafter", spec, weights)
    torch.save(learner, tmp / "learner.pt")
    (tmp / "records.msgpack").write_bytes(msgpack.packb(list(records), use_bin_type=True))
    (tmp / "state.json").write_text(json.dumps(state))
    files = _files(tmp)
    for f in files:
        _fsync(f)
    manifest = {
        "format": FORMAT,
        "step": step,
        "files": {str(f.relative_to(tmp)): {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in files},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    _fsync(tmp / "manifest.json")
    if final.exists():
        shutil.rmtree(final)
    tmp.replace(final)
    _fsync(root)
    latest_tmp = root / "latest.tmp"
    latest_tmp.write_text(final.name)
    _fsync(latest_tmp)
    latest_tmp.replace(root / "latest")
    _fsync(root)
    for old in _step_dirs(root)[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _step_dirs(root: Path) -> list[Path]:
    """Checkpoint directories, newest first."""
    found = (
        [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
        if root.is_dir()
        else []
    )
    return [p for _, p in sorted(found, reverse=True)]


def verify(path: Path) -> str | None:
    """None when the checkpoint at `path` is whole; otherwise what is wrong with it."""
    mf = path / "manifest.json"
    if not mf.is_file():
        return "no manifest.json (not a checkpoint of this format: written by an older dopd?)"
    try:
        manifest = json.loads(mf.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return f"manifest.json is unreadable ({type(e).__name__})"
    if manifest.get("format") != FORMAT:
        return f"checkpoint format {manifest.get('format')} (this dopd reads format {FORMAT})"
    for rel, want in files.items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{rel} has {f.stat().st_size} bytes, the manifest says {want['bytes']}"
        if _sha256(f) != want["sha256"]:
            return f"{rel} does not match its SHA-256 in the manifest"
    return None


def find(where: Path, log: Callable[[str], None] = print) -> Checkpoint:
    """The checkpoint to continue from. `where`: one checkpoint directory (it must verify), or a run directory / its
    checkpoints/ directory (the one `latest` names, else the newest that verifies, said in the log)."""
    where = Path(where)
    if (where / "manifest.json").is_file() or _STEP_DIR.match(where.name):
        bad = verify(where)
        if bad:
            raise DopdError(f"checkpoint {where} is damaged: {bad}")
        return Checkpoint(where)
    root = where / "checkpoints" if (where / "checkpoints").is_dir() else where
    if not root.is_dir():
        raise DopdError(f"nothing to resume in {where}: no checkpoints/ directory")
    named, why_named = None, ""
    latest = root / "latest"
    if latest.is_file():
        name = latest.read_text().strip()
        if _STEP_DIR.match(name) and (root / name).is_dir():
            named = root / name
        else:
            why_named = f"checkpoints/latest names {name!r}, which is not a checkpoint here"
    else:
        why_named = "checkpoints/latest is missing"
    if named is not None:
        bad = verify(named)
        if bad is None:
            return Checkpoint(named)
        why_named = f"{named.name} is damaged ({bad})"
        if (named / "manifest.json").is_file():  # torn after it was whole: out of the way, never the one kept
            moved = named.with_name(named.name + ".damaged")
            if moved.exists():
                shutil.rmtree(moved)
            named.replace(moved)
    problems = [why_named]
    for cand in _step_dirs(root):
        bad = verify(cand)
        if bad is None:
            log(f"dopd: {why_named}; resuming from {cand.name} instead")
            return Checkpoint(cand)
        problems.append(f"{cand.name} is damaged ({bad})")
    raise DopdError(f"nothing to resume in {where}: " + "; ".join(problems))
