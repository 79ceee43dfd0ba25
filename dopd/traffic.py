"""Served traffic as rollout data: the bounded hand-off between `dopd serve` replicas and a learning job.

`dopd serve --learn` is Draft-OPD whose prompts come from users. A replica answers a request with lossless
speculative decoding, then offers (prompt ids, answer ids) to the `TrafficFeed`, a named Ray actor, and forgets it:
the offer is a fire-and-forget `.remote()` call, so serving never waits for learning. The rollout actors of the
learning job (`rollout.source=traffic`) take the served texts from the feed and turn them into the same experience
records as any other rollout: the answer is the target's own text, re-segmented by the CURRENT drafter (blocks
drafted from the learner's weights, labelled by one target prefill), stamped (actor, incarnation, sequence, policy
version) and carrying the serving replica and request id in their meta. The feed also carries the newest published
weights back: replicas poll `latest()` between engine steps.

What the feed holds is token ids only, in this actor's memory, at most `rollout.traffic_buffer` texts: when full, the
oldest waiting text is dropped (counted in `dropped`): learning lags, serving does not. Nothing is written to disk
except the records a learner trained on, in the run's `opd_sequences.jsonl` and checkpoints, as in `dopd train`.
A request opts out with `"dopd_learn": false` in its body or the header `X-Dopd-Learn: 0` (docs/serve.md).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass

FEED_NAME = "dopd-traffic-feed"  # in Ray namespace "dopd" (dopd/connection.py)


@dataclass
class FeedStats:
    offered: int = 0  # texts offered by replicas
    accepted: int = 0  # texts queued
    dropped: int = 0  # texts dropped: the buffer was full (oldest first) or the text was malformed
    taken: int = 0  # texts handed to rollout actors
    depth: int = 0  # texts waiting now
    version: int = -1  # the newest published policy version


def _valid(item: dict) -> bool:
    """A served text the rollout can use: token-id lists, a non-empty prompt and answer (a replica's bug must not
    reach the learner as a malformed record)."""
    p, o = item.get("prompt"), item.get("output")
    return (
        isinstance(p, list)
        and isinstance(o, list)
        and len(p) > 0
        and len(o) > 0
        and all(type(t) is int and t >= 0 for t in p)
        and all(type(t) is int and t >= 0 for t in o)
    )


class TrafficFeed:
    """Bounded FIFO of served texts plus the newest weights (a plain class: `feed_actor` makes it a Ray actor)."""

    def __init__(self, capacity: int = 4096):
        if capacity < 1:
            raise ValueError(f"rollout.traffic_buffer must be >= 1, got {capacity}")
        self.items: deque[tuple[str, list[int], list[int], str]] = deque()
        self.capacity = capacity
        self.stats_ = FeedStats()
        self.cond = threading.Condition()
        self.weights: tuple[int, list | None] = (-1, None)
        self.serial = 0

    def offer(self, items: list[dict]) -> int:
        """Queue served texts ({"id", "prompt", "output", "replica"}); returns how many were queued."""
        n = 0
        with self.cond:
            for it in items:
                self.stats_.offered += 1
                if not isinstance(it, dict) or not _valid(it):
                    self.stats_.dropped += 1
                    continue
                if len(self.items) >= self.capacity:
                    self.items.popleft()
                    self.stats_.dropped += 1
                self.serial += 1
                rid = str(it.get("id") or f"req-{self.serial}")
                self.items.append((rid, list(it["prompt"]), list(it["output"]), str(it.get("replica", ""))))
                self.stats_.accepted += 1
                n += 1
            self.cond.notify_all()
        return n

    def take(self, n: int, wait_s: float = 1.0) -> list[tuple[str, list[int], list[int], str]]:
        """Up to n texts, oldest first, waiting up to wait_s for the first one (an actor's batch is what is there)."""
        deadline = time.monotonic() + wait_s
        with self.cond:
            while not self.items:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self.cond.wait(left)
            out = [self.items.popleft() for _ in range(min(n, len(self.items)))]
            self.stats_.taken += len(out)
            return out

    def publish(self, ref_box: list, version: int) -> None:
        """The learning job's newest weights (a boxed object ref: Ray does not resolve refs nested in a list)."""
        with self.cond:
            if version > self.weights[0]:
                self.weights = (version, ref_box)
                self.stats_.version = version

    def latest(self) -> tuple[int, list | None]:
        """(policy version, boxed weights ref) of the newest published weights; (-1, None) before the first."""
        return self.weights

    def stats(self) -> dict:
        with self.cond:
            self.stats_.depth = len(self.items)
            return asdict(self.stats_)


def feed_actor(capacity: int, name: str = FEED_NAME):
    """The feed as a named, detached-from-nothing Ray actor (get-or-create: a replica or a restarted learning job
    finds the same one). Threaded so that `take` waiting never blocks `offer` or `latest`."""
    import ray

    return (
        ray.remote(TrafficFeed)
        .options(name=name, namespace="dopd", get_if_exists=True, max_concurrency=16, num_cpus=0, max_restarts=-1)
        .remote(capacity)
    )
