"""The two groups the driver talks to: `RolloutFleet` (N rollout actors) and `LearnerGroup` (M ZeRO ranks).

Each wrapper owns its actors' placement, the fan-out of a call to every member, and recovery, so the Ray backend
reads as the algorithm (warm up, publish, step, checkpoint) instead of loops over handles. Neither reaches into the
other: publishing is `ref = learners.gather_weights()` then `fleet.set_weights(ref, version)`. The Ray actor
classes are plain module-level classes (actors/actor.py `RolloutActor`, learner/zero.py `LearnerActor`); Ray is
applied here, where they are placed (`ray.remote(**options)(Cls)`), so importing those modules never imports Ray.

Failures: a rollout actor is restarted by Ray (`max_restarts`); the fleet waits for the new incarnation, re-sends
the current weights and restarts its loop. A learner rank cannot be repaired inside the job (its torch.distributed
group is gone): `LearnerGroup` raises `LearnerLost` as soon as any rank's call fails, and the job stops with the
`dopd train --resume` hint.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import cache

from dopd.common.config import Config
from dopd.common.errors import DopdError


class LearnerLost(DopdError):
    """A learner rank died: the job must stop and be resumed from its last checkpoint."""


def _actor_gone() -> tuple:
    import ray

    return (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError)


@cache
def remote_class(kind: str):
    """The Ray actor class for 'rollout', 'learner' or 'shard' (made once per process)."""
    import ray

    if kind == "rollout":
        from dopd.actors.actor import RolloutActor

        return ray.remote(**RolloutActor.RAY_OPTIONS)(RolloutActor)
    if kind == "learner":
        from dopd.learner.zero import LearnerActor

        return ray.remote(LearnerActor)
    if kind == "shard":
        from dopd.queue import QueueShard

        return ray.remote(**QueueShard.RAY_OPTIONS)(QueueShard)
    raise ValueError(f"unknown Ray actor kind '{kind}' (rollout, learner or shard)")


def make_shards(cfg: Config, name: str) -> list:
    """S byte-bounded queue shards (Ray actors without a CPU: they only move bytes), on the driver's node when it
    can hold them: they die with the job anyway, and a worker node lost mid-run then takes no shard with it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    c = cfg.cluster
    Shard = remote_class("shard")
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return [
        Shard.options(name=f"{name}.shard.{s}", scheduling_strategy=here).remote(
            s, c.queue_max_bytes, c.queue_policy, c.max_staleness, c.max_record_bytes
        )
        for s in range(c.shards or c.learners)
    ]


def split_even(items: list, n: int) -> list[list]:
    """`items` in n contiguous, nearly equal chunks (in order: concatenating them gives `items` back)."""
    k, r = divmod(len(items), n)
    out, i = [], 0
    for j in range(n):
        size = k + (1 if j < r else 0)
        out.append(items[i : i + size])
        i += size
    return out


class RolloutFleet:
    """N rollout actors, actor i in placement-group bundle i; actor i feeds `routes[i]` shards."""

    def __init__(
        self,
        cfg: Config,
        name: str,
        pg,
        shards: list,
        prompts: list,
        log: Callable = print,
        on_restart: Callable | None = None,
        env: dict[str, str] | None = None,
        feed=None,
    ):
        c = cfg.cluster
        N = c.actors
        traffic = cfg.rollout.source == "traffic"  # served texts are rolled out, not the prompt set
        if len(prompts) < N and not traffic:  # an actor without prompts of its own would have rolled out everyone's
            raise DopdError(
                f"{N} rollout actors but only {len(prompts)} rollout prompts: each actor needs prompts of its own "
                f"(use --actors {max(1, len(prompts))} or fewer, or more prompts)"
            )
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.cfg, self.log, self.on_restart = cfg, log, on_restart
        self.looping = False  # the actors' produce loops run (cluster.rollout=async, after the first publish)
        Actor = remote_class("rollout")
        per_actor = [prompts[i::N] for i in range(N)]
        routes = actor_routes(shards, N)
        self.handles = [
            Actor.options(
                name=f"{name}.actor.{i}",
                num_cpus=c.actor_num_cpus,
                num_gpus=c.actor_num_gpus,
                max_restarts=c.max_actor_restarts,
                max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
                **({"runtime_env": {"env_vars": env}} if env else {}),
            ).remote(cfg.to_dict(), i, per_actor[i] or (prompts if traffic else []), routes[i], feed)
            for i in range(N)
        ]
        self.known: dict[int, int] = {}  # actor index -> incarnation
        self.restarts = 0
        self.weights: tuple | None = None  # (object ref, policy version) of the newest published weights
        import ray

        for i, info in enumerate(ray.get([a.ready.remote() for a in self.handles])):
            self.known[i] = info["incarnation"]

    def __len__(self) -> int:
        return len(self.handles)

    # --- fan-out calls --------------------------------------------------------------------------------------
    def start(self) -> None:
        self.looping = True
        self._each("start")

    def stop(self) -> None:
        self.looping = False
        self._each("stop")

    def set_weights(self, ref, version: int) -> None:
        """Every actor fetches the published weights (one object-store copy) and applies them between rollout
        batches; an actor that died meanwhile is recovered and gets them too."""
        import ray

        self.weights = (ref, version)
        acks = [a.set_weights.remote([ref], version) for a in self.handles]
        for i, ack in enumerate(acks):
            try:
                ray.get(ack)
            except _actor_gone():
                self.recover(i)

    def states(self) -> list:
        """Every actor's data position and RNG (for a checkpoint)."""
        return self._each("state")

    def load_states(self, states: list[dict]) -> list[bool]:
        """Every actor continues from its saved state; False where its prompt order starts afresh."""
        import ray

        return ray.get([a.load_state.remote(st) for a, st in zip(self.handles, states)])

    def produce(self, n: int) -> list[tuple[list[bytes], dict]]:
        """One synchronous round of n records, split over the actors in order (cluster.rollout=sync)."""

        counts = [len(c) for c in split_even(list(range(n)), len(self.handles))]
        refs = {i: self.handles[i].produce.remote(k) for i, k in enumerate(counts) if k}
        out = []
        for i in sorted(refs):
            while True:
                try:
                    out.append(self._get(refs[i]))
                    break
                except _actor_gone():  # a killed actor's share is produced again by its next incarnation
                    self.recover(i)
                    refs[i] = self.handles[i].produce.remote(counts[i])
        return out

    PROGRESS_S = 10.0  # how often the driver relays the actors' progress lines while it waits on their target work

    def _get(self, ref):
        """`ray.get(ref)`, printing meanwhile what the actors report of long target work (progress with a rate and
        an ETA): an actor's output does not reach the driver's console otherwise."""
        import ray

        while not ray.wait([ref], timeout=self.PROGRESS_S)[0]:
            self.relay()
        self.relay()
        return ray.get(ref)

    def relay(self) -> None:
        import ray

        try:
            notes = ray.get([a.progress.remote() for a in self.handles], timeout=self.PROGRESS_S)
        except Exception:  # an actor restarting: its lines are lost, the work is not
            return
        for i, lines in enumerate(notes):
            for line in lines:
                self.log(f"actor {i}: {line}" if len(self.handles) > 1 else line)

    def _each(self, method: str) -> list:
        import ray

        out = []
        refs = [getattr(a, method).remote() for a in self.handles]
        for i, ref in enumerate(refs):
            try:
                out.append(ray.get(ref))
            except _actor_gone():
                self.recover(i)
                out.append(ray.get(getattr(self.handles[i], method).remote()))
        return out

    def teacher_data(self, items: list) -> list[bytes]:
        """SFT warm-up data from every actor at once: `items` split in N contiguous chunks, answers concatenated
        in the same order (deterministic for a given N: each chunk is answered with the config's seed)."""

        chunks = split_even(items, len(self.handles))
        refs = {i: self.handles[i].teacher_data.remote(ch) for i, ch in enumerate(chunks) if ch}
        out: list[bytes] = []
        for i, ch in enumerate(chunks):
            if not ch:
                continue
            while True:
                try:
                    out += self._get(refs[i])
                    break
                except _actor_gone():  # a killed actor's chunk is answered again by its next incarnation
                    self.recover(i, start=False)
                    refs[i] = self.handles[i].teacher_data.remote(ch)
        return out

    def evaluate(self, ref, prompt_ids: list) -> dict:
        """The held-out evaluation of the weights `ref` (the learners'), on the first actor that answers."""

        for i, a in enumerate(self.handles):
            try:
                return self._get(a.evaluate.remote([ref], prompt_ids))
            except _actor_gone():
                self.recover(i)
        raise DopdError("no rollout actor could run the held-out evaluation")

    # --- health ---------------------------------------------------------------------------------------------
    def check(self) -> list[tuple[int, dict]]:
        """Every actor's stats; a dead or restarted actor is recovered first. A loop error stops the job."""
        import ray

        refs = [a.stats.remote() for a in self.handles]
        out = []
        for i, ref in enumerate(refs):
            try:
                st = ray.get(ref, timeout=60)
            except _actor_gone():
                self.recover(i)
                continue
            if st["incarnation"] != self.known.get(i):
                self.recover(i)
                continue
            if st["error"]:
                raise DopdError(f"rollout actor {i} failed:\n{st['error']}")
            out.append((i, st))
        return out

    def recover(self, i: int, start: bool = True) -> None:
        """Wait for Ray to bring actor i back, then give it the current weights and restart its loop."""
        import ray

        deadline = time.time() + 600
        while True:
            try:
                info = ray.get(self.handles[i].ready.remote(), timeout=60)
                break
            except _actor_gone() as e:
                if time.time() > deadline:  # out of restarts (cluster.max_actor_restarts) or the node is gone
                    raise DopdError(f"rollout actor {i} did not come back after a failure: {e}") from None
                time.sleep(1)
        if info["incarnation"] != self.known.get(i):
            self.known[i] = info["incarnation"]
            self.restarts += 1
            if self.on_restart is not None:
                self.on_restart(i)
            self.log(f"dopd: rollout actor {i} restarted (incarnation {info['incarnation']}); re-sending weights")
        if self.weights is not None:
            ray.get(self.handles[i].set_weights.remote([self.weights[0]], self.weights[1]))
        if start and self.looping and self.weights is not None:
            ray.get(self.handles[i].start.remote())


def actor_routes(shards: list, N: int) -> list[list]:
    """Routing by actor: actor i feeds shard i % S; with fewer actors than shards, actor i feeds every shard s with
    s % N == i (round-robin), so every learner rank's shard has a producer."""
    S = len(shards)
    return [[shards[s] for s in range(S) if s % N == i] if N < S else [shards[i % S]] for i in range(N)]


class LearnerGroup:
    """M learner ranks in one torch.distributed group; rank r reads shards s with s % M == r."""

    def __init__(
        self, cfg: Config, name: str, pg, shards: list, first_bundle: int | None, env: dict[str, str] | None = None
    ):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        c = cfg.cluster
        M, S = c.learners, len(shards)
        device = "cuda" if c.learner_num_gpus > 0 else "cpu"
        Learner = remote_class("learner")
        self.handles = []
        for r in range(M):
            mine = [shards[s] for s in range(S) if s % M == r] or [shards[r % S]]
            opts = {"name": f"{name}.learner.{r}", "num_cpus": c.learner_num_cpus, "num_gpus": c.learner_num_gpus}
            if env:
                opts["runtime_env"] = {"env_vars": env}
            if first_bundle is not None:
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=first_bundle + r
                )
            self.handles.append(Learner.options(**opts).remote(cfg.to_dict(), r, M, mine, device))
        addr, port = ray.get(self.handles[0].rendezvous.remote())
        port = c.master_port or port
        ray.get([h.init.remote(addr, port) for h in self.handles])

    def __len__(self) -> int:
        return len(self.handles)

    def _all(self, refs: list, wait: Callable | None = None, every_s: float = 5.0) -> list:
        """Results of one call on every rank; `wait()` runs every `every_s` while they work. Any rank failing stops
        the group at once (the others would block in their collectives)."""
        import ray

        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=every_s)
            for r in ready:
                try:
                    ray.get(r)
                except ray.exceptions.RayError as e:
                    # a dead rank (RayActorError), or a live one whose collective broke because a peer died
                    # (RayTaskError from gloo/NCCL): either way the group is gone and only a resume repairs it
                    lines = [x for x in str(e).splitlines() if x.strip()]
                    raise LearnerLost(
                        f"a learner rank failed ({type(e).__name__}: {(lines[-1] if lines else '')[:240]})"
                    ) from None
            if pending and wait is not None:
                wait()
        return ray.get(refs)

    def opd_step(self, version: int, wait: Callable | None = None, records: list[list[bytes]] | None = None) -> list:
        """One step on every rank: each pulls its micro-batch from its shard(s), or trains `records[rank]`."""
        if records is not None:
            return self._all([h.opd_step.remote(version, records[r]) for r, h in enumerate(self.handles)], wait)
        return self._all([h.opd_step.remote(version) for h in self.handles], wait)

    def sft_step(self) -> list:
        return self._all([h.sft_step.remote() for h in self.handles])

    def set_teacher(self, data: list[bytes]) -> None:
        """Every rank gets the same list (one object-store copy) and keeps its own slice."""
        import ray

        box = [ray.put(data)]
        self._all([h.set_teacher.remote(box) for h in self.handles])

    def gather_weights(self):
        """Every rank takes part in the gather (ZeRO-3 partitions the parameters); rank 0's full state lands in the
        object store once. Returns its object ref (what `RolloutFleet.set_weights` hands the actors)."""
        refs = [h.gather_weights.remote() for h in self.handles]
        self._all(refs)
        return refs[0]

    def spec(self) -> dict:
        import ray

        return ray.get(self.handles[0].spec.remote())

    def num_parameters(self) -> int:
        import ray

        return ray.get(self.handles[0].num_parameters.remote())

    def vocab_chosen(self) -> bool:
        import ray

        return ray.get(self.handles[0].vocab_chosen.remote())

    def training_state(self) -> dict:
        """Optimizer (gathered), schedule, every rank's RNGs and data position: one world-size-independent blob."""
        from dopd.learner.learner import merge_training_states

        return merge_training_states(self._all([h.training_state.remote() for h in self.handles]))

    def load(self, weights_ref, state_ref) -> list[int]:
        return self._all([h.load.remote([weights_ref], [state_ref]) for h in self.handles])
