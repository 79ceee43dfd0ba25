"""Weight publishing: learner rank 0's full drafter -> every rollout actor, through the Ray object store.

Every rank takes part in the gather (with ZeRO-3 the parameters are partitioned and gathering is a collective);
rank 0's result lands in the object store once and each actor fetches it from there (Ray moves it node to node
with its own transfer, so 16 actors on one node share one copy). Actors apply new weights between rollout
batches and stamp the new policy version on everything they produce after. Only the drafter's own state travels:
the frozen embedding and head are the target's, which every actor already has.
"""

from __future__ import annotations

import time

import ray


def publish(learners: list, actors: list, version: int) -> tuple[float, object, list[int]]:
    """Gather on all ranks, hand rank 0's state to every actor. Returns (latency_s, state_ref, failed actor ids)."""
    t0 = time.perf_counter()
    refs = [learner.gather_weights.remote() for learner in learners]
    ray.wait(refs, num_returns=len(refs))
    state_ref = refs[0]
    acks = [a.set_weights.remote([state_ref], version) for a in actors]
    failed = []
    for i, ack in enumerate(acks):
        try:
            ray.get(ack)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            failed.append(i)
    return time.perf_counter() - t0, state_ref, failed
