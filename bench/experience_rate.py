"""Experience records/s and rollout tokens/s with 1, 2 and 4 rollout actors sharing this machine.

    python bench/experience_rate.py [--drafter DIR] [--seconds 90]

Real rollout actors (SmolLM2 target + drafter copy, one torch thread each) produce into one queue shard for a
fixed window after warm-up; the shard's accepted count / window is the experience rate. On a 2-core machine 4
actors oversubscribe the CPU: the numbers show how throughput scales (or does not) with actors per core.
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--drafter", default=None, help="drafter directory to load into the actors (default: fresh)")
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--seconds", type=float, default=90)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="under 3 minutes on 2 cores: 1 and 2 actors, 20 s windows")
    a = ap.parse_args()
    from dopd.common.hardware import bench_start

    bench_start(a, dict(actors=[1, 2], seconds=20.0, max_new_tokens=32))
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from dopd.common.load import load_config
    from dopd.common.models import resolve_target
    from dopd.fleet import remote_class
    from dopd.prompts import encode_all, load_prompt_set, split_prompts

    ov = [f"model.target={a.target}", f"rollout.max_new_tokens={a.max_new_tokens}", "rollout.batch_size=4"]
    if a.drafter:
        ov.append(
            f"drafter.init={os.path.abspath(a.drafter)}"
        )  # actors build it (reduced vocab included) from the directory
    cfg = load_config(None, ov)
    tok = AutoTokenizer.from_pretrained(resolve_target(a.target))
    sp = split_prompts(load_prompt_set("champ"), 16, 0)
    ids, ps = encode_all(tok, sp.train[:400], 384, drop_long=True)
    prompts = [(p.id, i) for p, i in zip(ps, ids)]
    if a.drafter:
        state = {k: v.numpy() for k, v in load_file(os.path.join(a.drafter, "model.safetensors")).items()}
    else:  # the fresh drafter every actor would build (same seed)
        from dopd.common.drafters import build_drafter
        from dopd.common.models import load_frozen_io

        info, embed, head, hf = load_frozen_io(a.target)
        state = {
            k: v.numpy()
            for k, v in build_drafter(cfg.drafter, info, hf, embed, head, seed=cfg.seed).state_dict().items()
        }
    ray.init(
        address="local",
        num_cpus=max(a.actors) + 1,
        object_store_memory=1 << 30,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )
    Actor, Shard = remote_class("rollout"), remote_class("shard")
    print(
        f"target {a.target}, drafter {a.drafter or 'fresh'}, {a.max_new_tokens} new tokens per prompt, window {a.seconds:.0f}s"
    )
    for n in a.actors:
        shard = Shard.remote(0, 2**34)
        actors = [Actor.remote(cfg.to_dict(), i, prompts[i::n], [shard]) for i in range(n)]
        ref = ray.put(state)
        ray.get([x.set_weights.remote([ref], 1) for x in actors])
        ray.get([x.start.remote() for x in actors])
        time.sleep(20)  # warm-up: first batches include loading and allocator growth
        s0 = ray.get(shard.get_stats.remote())["accepted"]
        t0 = [ray.get(x.stats.remote())["totals"]["tokens"] for x in actors]
        time.sleep(a.seconds)
        s1 = ray.get(shard.get_stats.remote())["accepted"]
        t1 = [ray.get(x.stats.remote())["totals"]["tokens"] for x in actors]
        ray.get([x.stop.remote() for x in actors])
        print(
            f"{n} actor(s): {(s1 - s0) / a.seconds:6.2f} records/s  {(sum(t1) - sum(t0)) / a.seconds:7.1f} rollout tokens/s"
        )
        for x in actors + [shard]:
            ray.kill(x)
    ray.shutdown()


if __name__ == "__main__":
    main()
