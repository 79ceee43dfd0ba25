"""Weight-publish latency through the Ray object store to N rollout actors (default 16).

    python bench/publish_latency.py

Uses the real publishing path (dopd/fleet.py: `LearnerGroup.gather_weights()` then `RolloutFleet.set_weights()`): a
learner-side actor returns the full drafter state (the object store keeps one copy), each of N receiver actors
fetches it, as rollout actors do. Sizes: the SmolLM2
EAGLE-3 drafter (its own state only: the frozen embedding/head are the target's and never travel) and a
100M-parameter drafter (fp32). Reported: median and max over repeats, from the gather call to the last actor
holding the weights.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--actors", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="under 3 minutes on 2 cores: 4 actors, 2 repeats")
    a = ap.parse_args()
    from dopd.common.hardware import bench_start

    bench_start(a, dict(actors=4, repeats=2))
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from dopd.common.config import DrafterConfig
    from dopd.common.drafters import build_drafter
    from dopd.common.models import load_frozen_io
    from dopd.fleet import LearnerGroup, RolloutFleet

    info, embed, head, hf = load_frozen_io("smollm2-135m")
    d = build_drafter(DrafterConfig(kind="eagle3"), info, hf, embed, head)
    eagle_state = {k: v.numpy() for k, v in d.state_dict().items()}
    sizes = {
        f"SmolLM2 EAGLE-3 drafter ({sum(v.size for v in eagle_state.values()) / 1e6:.1f}M params)": eagle_state,
        "100M-parameter drafter": {
            f"w{i}": np.random.default_rng(i).standard_normal(10_000_000, dtype=np.float32) for i in range(10)
        },
    }
    ray.init(
        address="local",
        num_cpus=a.actors + 1,
        object_store_memory=2 << 30,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )

    @ray.remote(num_cpus=0)
    class Learner:
        def set(self, state):
            self.state = state

        def gather_weights(self):
            return self.state

    @ray.remote(num_cpus=0)
    class Receiver:
        def set_weights(self, box, version):
            state = ray.get(box[0])
            self.n = sum(v.nbytes for v in state.values())
            return version

    receivers = [Receiver.remote() for _ in range(a.actors)]
    ray.get([r.set_weights.remote([ray.put({"x": np.zeros(1)})], 0) for r in receivers])
    fleet = RolloutFleet.__new__(RolloutFleet)  # the groups' publishing calls, around these stand-in actors
    fleet.handles, fleet.weights = receivers, None
    for name, state in sizes.items():
        learner = Learner.remote()
        ray.get(learner.set.remote(state))
        learners = LearnerGroup.__new__(LearnerGroup)
        learners.handles = [learner]
        lat = []
        for v in range(a.repeats + 1):
            t0 = time.perf_counter()
            fleet.set_weights(learners.gather_weights(), v)
            if v:  # the first is a warm-up
                lat.append(time.perf_counter() - t0)
        mb = sum(x.nbytes for x in state.values()) / 2**20
        print(
            f"{name:45s} {mb:8.1f} MiB -> {a.actors} actors: median {statistics.median(lat):.3f} s, max {max(lat):.3f} s"
        )
        ray.kill(learner)
    ray.shutdown()


if __name__ == "__main__":
    main()
