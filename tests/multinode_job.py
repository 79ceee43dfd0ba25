"""A dopd job on a multi-node Ray (ray.cluster_utils.Cluster: one raylet and object store per node, on loopback),
run in its own process by tests/test_multinode.py (never inside the test session's shared Ray).

Nodes: a head with no CPUs (only the driver's control plane) and four 2-CPU workers, each with its own custom
resource (node_0..node_3). `--actors 4 --learners 2` needs 6 CPUs: its placement group spans three workers, one
stays spare. At OPD step 3 a record taken from a shard is offered twice (a duplicate delivered: the shard refuses
it); at step 4 a worker holding only actors is killed: Ray moves its bundles to the spare node, the fleet waits for
the restarted actors and re-sends the weights, and the run goes on to its planned step. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(out: str) -> None:
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.placement_group import placement_group_table

    from dopd.common.load import load_config
    from dopd.driver import RayFleet
    from dopd.train import train

    mem = 80 * 2**20
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "object_store_memory": mem, "include_dashboard": False},
    )
    workers = [cluster.add_node(num_cpus=2, resources={f"node_{i}": 1}, object_store_memory=mem) for i in range(4)]
    env = {
        "RAY_AUTH_MODE": "disabled",
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    ray.init(address=cluster.address, namespace="dopd", log_to_driver=False, runtime_env={"env_vars": env})
    cluster.wait_for_nodes()
    cfg = load_config(None, [
        "runner=ray", "model.target=tiny-random-llama", "data.prompts=champ-problems", "data.num_eval=4", "mode=opd",
        "sft.num_prompts=16", "sft.max_new_tokens=16", "sft.warmup_steps=2", "rollout.max_new_tokens=16",
        "rollout.batch_size=2", "eval.max_new_tokens=12", "eval.num_prompts=4", "learner.micro_batch_size=2",
        "learner.refresh_every=2", "learner.steps=8", "learner.checkpoint_every=4", "learner.eval_every=100",
        "cluster.actors=4", "cluster.learners=2", "metrics.port=0", f"out_dir={out}",
    ])  # fmt: skip
    seen: dict = {}
    by_id = {w.node_id: (i, w) for i, w in enumerate(workers)}

    def on_step(job, step):
        if step == 2:
            table = placement_group_table(job.pg)
            seen["bundles"] = {int(k): v for k, v in table["bundles_to_node_id"].items()}
            seen["learner_nodes"] = [seen["bundles"][4], seen["bundles"][5]]
        if step == 3:  # a duplicate delivered: the same record offered twice
            taken = ray.get(job.shards[0].get.remote(1, job.policy_version, 60.0))
            seen["duplicate"] = ray.get(job.shards[0].put_many.remote([taken[0], taken[0]]))
        if step == 4:
            b = seen["bundles"]
            # every node here is 127.0.0.1, so the driver may have attached to a worker's raylet: the queue shards
            # live on the driver's node (dopd/fleet.py), and that node must survive with the driver
            seen["driver_node"] = ray.get_runtime_context().get_node_id()
            where = lambda self: ray.get_runtime_context().get_node_id()  # noqa: E731  (runs inside the shard)
            seen["shard_nodes"] = sorted(set(ray.get([sh.__ray_call__.remote(where) for sh in job.shards])))
            keep = set(seen["learner_nodes"]) | {seen["driver_node"]} | set(seen["shard_nodes"])
            actor_only = sorted(n for n in set(b.values()) if n in by_id and n not in keep)
            seen["killed"] = actor_only[0] if actor_only else None
            if actor_only:
                seen["killed_bundles"] = sorted(k for k, v in b.items() if v == actor_only[0])
                cluster.remove_node(by_id[actor_only[0]][1], allow_graceful=False)
        if step == 6:
            table = placement_group_table(job.pg)
            seen["bundles_after"] = {int(k): v for k, v in table["bundles_to_node_id"].items()}

    job = RayFleet(cfg, log=lambda *a: print(*a, file=sys.stderr))
    summary = train(cfg, job, on_step=on_step)
    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    print(json.dumps({"summary": summary, "seen": seen, "alive": alive, "workers": list(by_id)}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
