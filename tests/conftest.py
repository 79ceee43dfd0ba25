"""Shared fixtures: one tiny target per session, one local Ray per session, small thread counts (2-core CI)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

torch.set_num_threads(2)


TINY_TEXTS = [
    "hi",
    "write a function that sums a list",
    "2+2=?",
    "tell me a long story about a dragon and a knight",
    "ok",
]


@pytest.fixture(scope="session")
def tiny():
    from dopd.common.models import load_target

    return load_target("tiny-random-llama")


@pytest.fixture(scope="session")
def smollm2():
    from dopd.common.models import load_target

    return load_target("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_prompts(tiny):
    """Chat-templated prompts of different lengths."""
    texts = TINY_TEXTS
    return [
        tiny.tokenizer.apply_chat_template(
            [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for t in texts
    ]


@pytest.fixture(scope="session")
def trained_tiny_drafter(tiny, tmp_path_factory):
    """A tiny EAGLE-3 drafter after a short SFT (partial acceptance: exercises accept and reject paths)."""
    from dopd.common.load import load_config
    from dopd.local import InProcess
    from dopd.train import train

    out = tmp_path_factory.mktemp("tiny_sft")
    cfg = load_config(None, [
        "model.target=tiny-random-llama", "data.prompts=champ-problems", "data.num_eval=4", "mode=sft",
        "sft.num_prompts=96", "sft.max_new_tokens=48", "learner.steps=120", "learner.lr=3e-3", "learner.eval_every=1000",
        "learner.checkpoint_every=1000", "eval.num_prompts=4", "eval.max_new_tokens=24", f"out_dir={out}",
    ])  # fmt: skip
    backend = InProcess(cfg, target=tiny, log=lambda *a: None)
    train(cfg, backend)
    return backend.drafter.eval()


@pytest.fixture(scope="session")
def trained_tiny_dflash(tiny, tmp_path_factory):
    """A tiny DFlash drafter fitted (SFT) to the target's answers to `tiny_prompts`: its drafts get accepted,
    several per step, so the engine's DFlash path (context K/V written for several new positions at once, rows
    advancing unevenly) really runs. (A DFlash drafter trained on a general prompt set this briefly is not accepted
    on a random tiny target: tau 1.02.)"""
    import json

    from dopd.common.load import load_config
    from dopd.local import InProcess
    from dopd.train import train

    out = tmp_path_factory.mktemp("tiny_dflash_sft")
    with open(out / "prompts.jsonl", "w") as f:
        for i, t in enumerate(TINY_TEXTS + ["held out"]):
            f.write(json.dumps({"id": f"t{i}", "prompt": t}) + "\n")
    cfg = load_config(None, [
        "model.target=tiny-random-llama", f"data.prompts={out / 'prompts.jsonl'}", "data.num_eval=1", "mode=sft",
        "drafter.kind=dflash", "sft.num_prompts=6", "sft.max_new_tokens=48", "learner.steps=60", "learner.lr=1e-2",
        "learner.eval_every=1000", "learner.checkpoint_every=1000", "eval.num_prompts=1", "eval.max_new_tokens=8", f"out_dir={out}",
    ])  # fmt: skip
    backend = InProcess(cfg, target=tiny, log=lambda *a: None)
    train(cfg, backend)
    return backend.drafter.eval()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (ray.init takes seconds); token auth off on loopback for tests only."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    ray.init(
        address="local",
        num_cpus=4,
        object_store_memory=300 * 2**20,
        include_dashboard=False,
        namespace="dopd",
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        runtime_env={
            "env_vars": {
                "RAY_AUTH_MODE": "disabled",
                "DS_ACCELERATOR": "cpu",
                "TOKENIZERS_PARALLELISM": "false",
                "OMP_NUM_THREADS": "1",
            }
        },
    )
    yield ray
    ray.shutdown()
