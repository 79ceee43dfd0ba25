"""Load on a live `dopd serve` through the `openai` client: tok/s, TTFT and latency at concurrency 1 / 4 / 16.

    python bench/serve_load.py --target smollm2-135m --drafter runs/demo/drafter     # both arms, started here
    python bench/serve_load.py --quick                                              # tiny target, < 3 min
    python bench/serve_load.py --url http://127.0.0.1:8000 --model smollm2-135m      # a server already running

Arms, each a fresh Serve app on loopback started by this script, at the same prompts and settings:
(a) `target`: the target alone (no drafter, block size 0), (b) `static`: the drafter, never updated, (c) `learn`:
`dopd serve --learn` from the same drafter (1 learning actor, 1 ZeRO rank, publishing every step: what learning
costs the server that does it; `--arms target,static,learn`; a drafter given as init-<kind> is saved to a temporary
directory first, since --learn starts from a directory). `learn` runs last: its learning job keeps training until
the script exits. Each request streams (chat completions, greedy unless
--temperature), so TTFT is the time to the first non-empty delta; latency is the whole request; tok/s is completion
tokens (the server's own usage counts) over the wall time of the level. Prompts are drawn with a fixed seed from a
builtin set or --prompts (one JSON object with "prompt" or "messages" per line); a level sends --requests requests
(at least its concurrency). One row per (arm, concurrency), printed as it is measured.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dopd.common.hardware import bench_start  # noqa: E402


def load_messages(a) -> list[list[dict]]:
    if a.prompts and Path(a.prompts).is_file():
        out = []
        for line in Path(a.prompts).read_text().splitlines():
            if line.strip():
                o = json.loads(line)
                out.append(o["messages"] if "messages" in o else [{"role": "user", "content": o["prompt"]}])
        return out
    from dopd.prompts import load_prompt_set

    return [p.as_messages() for p in load_prompt_set(a.prompts or "champ-problems")]


def one(client, model, messages, a) -> tuple[float, float, int]:
    """(ttft_s, latency_s, completion tokens) of one streamed request."""
    t0 = time.perf_counter()
    ttft, toks = None, 0
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=a.max_tokens, temperature=a.temperature, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    for ch in stream:
        if ttft is None and ch.choices and ch.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        if ch.usage is not None:
            toks = ch.usage.completion_tokens
    lat = time.perf_counter() - t0
    return (ttft if ttft is not None else lat), lat, toks


def level(url, model, msgs, conc, a) -> dict:
    import openai

    rng = random.Random(a.seed * 1000 + conc)
    batch = [msgs[rng.randrange(len(msgs))] for _ in range(max(a.requests, conc))]
    clients = [openai.OpenAI(base_url=f"{url}/v1", api_key=a.api_key, max_retries=0, timeout=600) for _ in range(conc)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(conc) as ex:
        res = list(ex.map(lambda i: one(clients[i % conc], model, batch[i], a), range(len(batch))))
    wall = time.perf_counter() - t0
    ttft = np.array([r[0] for r in res])
    lat = np.array([r[1] for r in res])
    toks = sum(r[2] for r in res)
    return {
        "requests": len(res), "tokens": toks, "wall_s": wall, "tok_s": toks / wall,
        "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p99": float(np.percentile(ttft, 99)),
        "lat_p50": float(np.percentile(lat, 50)), "lat_p99": float(np.percentile(lat, 99)),
    }  # fmt: skip


def run_arm(name, url, model, msgs, a) -> list[dict]:
    level(url, model, msgs[:2], 1, argparse.Namespace(**{**vars(a), "requests": 1}))  # warm-up
    rows = []
    for c in a.concurrency:
        r = {"arm": name, "concurrency": c, **level(url, model, msgs, c, a)}
        print(
            f"{name:8s} c={c:<3d} req={r['requests']:<4d} tok={r['tokens']:<6d} tok/s={r['tok_s']:8.1f}  "
            f"TTFT p50/p99 {r['ttft_p50']:.3f}/{r['ttft_p99']:.3f}s  latency p50/p99 {r['lat_p50']:.3f}/{r['lat_p99']:.3f}s",
            flush=True,
        )
        rows.append(r)
    return rows


def start_learning(opts, a):
    """The `learn` arm: `dopd serve --learn` in this process (as the CLI starts it), learning run in a temp dir."""
    import tempfile

    from dopd.serve_learn import learn_config, serve_and_learn

    tmp = Path(tempfile.mkdtemp(prefix="dopd-serve-load-"))
    drafter = a.drafter
    if not Path(drafter).is_dir():  # init-<kind>: --learn starts from a directory
        from dopd.common.drafters import drafter_for_target
        from dopd.common.models import load_target

        drafter_for_target(drafter, load_target(a.target, quiet=True)).save_pretrained(tmp / "drafter")
        drafter = str(tmp / "drafter")
    cfg = learn_config(a.target, drafter, tmp / "run", actors=1, learners=1, overrides=[
        f"learner.steps={a.learn_steps}", "learner.refresh_every=1", "learner.eval_every=1000000",
        "learner.checkpoint_every=1000000", "metrics.port=0", "cluster.actor_num_cpus=0.5",
    ])  # fmt: skip
    return serve_and_learn(replace(opts, drafter=drafter), cfg, None, log=lambda m: print(m, flush=True))


def learning_state(learning) -> dict:
    """Where the learning run is when the arm ends: its steps so far (from metrics.jsonl) and the feed's counts."""
    import ray

    from dopd.traffic import FEED_NAME

    steps = 0
    rows = learning.cfg.out_dir and Path(learning.cfg.out_dir) / "metrics.jsonl"
    if rows and rows.is_file():
        steps = sum(1 for line in rows.read_text().splitlines() if line.strip() and json.loads(line)["event"] == "step")
    feed = ray.get(ray.get_actor(FEED_NAME, namespace="dopd").stats.remote())
    return {"learner_steps": steps, "alive": learning.alive(), "error": learning.error[-300:], "feed": feed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--drafter", default="init-eagle3", help="drafter directory or init-<kind> for the static arm")
    p.add_argument("--prompts", default=None, help="builtin prompt set or JSONL file (default champ-problems)")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=32, help="requests per level (at least the concurrency)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--block-size", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16, help="rows per replica batch")
    p.add_argument("--threads", type=int, default=2, help="torch threads per replica")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--arms", default="target,static")
    p.add_argument("--url", default=None, help="drive this running server instead (one arm, named 'server')")
    p.add_argument("--model", default=None, help="with --url: the model id (default: --target)")
    p.add_argument("--api-key", default="unused-on-loopback")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--learn-steps", type=int, default=100_000, help="learn arm: learner.steps (default: never ends)")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    bench_start(a, quick={"target": "tiny-random-llama", "requests": 16, "max_tokens": 24, "prompts": "champ-problems"})
    msgs = load_messages(a)
    print(
        f"target {a.target}; drafter {a.drafter}; {len(msgs)} prompts; max_tokens {a.max_tokens}; "
        f"T {a.temperature}; K {a.block_size}; seed {a.seed}",
        flush=True,
    )
    rows = []
    if a.url:
        rows += run_arm("server", a.url, a.model or a.target, msgs, a)
    else:
        import os

        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        from dopd import serve as dserve

        arms = a.arms.split(",")
        unknown = set(arms) - {"target", "static", "learn"}
        if unknown:
            p.error(f"--arms: unknown arm(s) {sorted(unknown)} (choose from target, static, learn)")
        if "learn" in arms and arms[-1] != "learn":
            p.error("--arms: `learn` must come last (its learning job runs until the script exits)")
        for arm in arms:
            opts = dserve.ServeOptions(
                target=a.target, drafter=None if arm == "target" else a.drafter, port=a.port,
                block_size=a.block_size, batch_size=a.batch_size, max_tokens=max(a.max_tokens, 16),
                max_concurrent=max(a.concurrency) * 2, threads=a.threads, replica_num_cpus=1,
            )  # fmt: skip
            t0 = time.perf_counter()
            learning = None
            if arm == "learn":
                url, learning = start_learning(opts, a)
            else:
                url = dserve.start(opts)
                dserve.wait_running()
            print(f"{arm}: server up at {url} in {time.perf_counter() - t0:.1f}s", flush=True)
            try:
                rows += run_arm(arm, url, a.target, msgs, a)
                if learning is not None:
                    st = learning_state(learning)
                    rows[-1]["learning"] = st
                    print(f"learn: {st}", flush=True)
            finally:
                dserve.stop()
    by = {(r["arm"], r["concurrency"]): r for r in rows}
    for c in a.concurrency:
        if ("target", c) in by and ("static", c) in by:
            print(f"c={c}: static / target tok/s = {by[('static', c)]['tok_s'] / by[('target', c)]['tok_s']:.2f}")
        if ("learn", c) in by and ("static", c) in by:
            print(f"c={c}: learn / static tok/s = {by[('learn', c)]['tok_s'] / by[('static', c)]['tok_s']:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
