"""The rollout actor: a target and a drafter copy that turn prompts into experience records, forever.

`RolloutWorker` is the algorithm with no Ray in it (the shared recipe `ExperienceMaker` -> encoded records, weight
swaps, held-out evaluation, SFT data); `RolloutActor` is the Ray actor around it (dopd/fleet.py applies
`ray.remote`): with `cluster.rollout=async` a loop thread produces batches and pushes them into its queue shards
(one batched put per shard, waiting inside the shard while it is full: backpressure), while the driver calls
`set_weights`, `evaluate` and `stats` concurrently; with `sync` the driver asks for one round at a time (`produce`).
Weights are swapped only between batches, under a lock, and
every record is stamped with the policy version that produced it plus (actor id, incarnation, sequence number):
a restarted actor gets a new random incarnation, so no record id is ever reused.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
import uuid
from collections.abc import Callable

import numpy as np
import torch

from dopd.common.config import Config
from dopd.common.drafters import Drafter, build_drafter
from dopd.common.greedy import prefill
from dopd.common.load import config_from_dict
from dopd.common.models import Target, load_target
from dopd.common.record import encode_record, encode_teacher
from dopd.common.sampler import EpochSampler

from .experience import ExperienceMaker


class RolloutWorker:
    """Holds the target + a drafter copy; produces encoded experience records (no Ray).

    The in-process runner uses one directly (its policy copy); each Ray rollout actor wraps one. Everything
    target-side goes through `ExperienceMaker`, the one recipe both runners share.
    """

    def __init__(
        self, cfg: Config, actor_id: int, prompts: list[tuple[str, list[int]]], incarnation: int | None = None,
        target: Target | None = None, log=None,
    ):  # fmt: skip
        self.cfg = cfg
        self.actor_id = actor_id
        self.incarnation = incarnation if incarnation is not None else uuid.uuid4().int & 0x7FFFFFFF
        self.target = target or load_target(
            cfg.model.target,
            cfg.model.device,
            cfg.model.dtype,
            quiet=True,
            forward=cfg.model.forward,
            compile=cfg.model.compile,
        )
        t = self.target
        # a reduced draft vocabulary is chosen by the learner side from the SFT data; until the first weights
        # arrive this copy holds a placeholder map (it drafts nothing before then)
        self.drafter = self._copy()
        self.eval_drafter: Drafter | None = None  # evaluates weights it is handed (the learner's), built on first use
        self.maker = ExperienceMaker(t, cfg, log=log)
        self.prompts = prompts
        self.policy_version = -1
        self.seq_no = 0
        self.batch_no = 0
        self.sampler = EpochSampler(len(prompts), (cfg.seed, actor_id))
        self.rng = np.random.default_rng([cfg.seed, actor_id, self.incarnation])
        # rollout.source=traffic: n -> up to n served texts (id, prompt ids, answer ids), set by the Ray actor
        # around this worker (dopd/traffic.py); None = the run's prompt set, in the sampler's order
        self.source: Callable[[int], list[tuple]] | None = None

    def _copy(self) -> Drafter:
        t = self.target
        d = build_drafter(
            self.cfg.drafter,
            t.info,
            t.model.config,
            t.embed_tokens.weight,
            t.lm_head.weight,
            seed=self.cfg.seed,
            placeholder_vocab=True,
        )
        return d.to(t.device).eval().requires_grad_(False)

    def set_weights(self, state: dict, version: int) -> None:
        self.drafter.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
        self.policy_version = version

    def state(self) -> dict:
        """What a checkpoint keeps of this worker: record numbering, the prompt order's position, its RNG."""
        return {
            "seq_no": self.seq_no,
            "batch_no": self.batch_no,
            "sampler": self.sampler.state(),
            "rng": self.rng.bit_generator.state,
        }

    def load_state(self, state: dict) -> bool:
        """Continue a checkpoint's numbering, RNG and prompt order; False (the order starts afresh) when the order was
        saved for other prompts or another seed (a run started from another run's checkpoint)."""
        self.seq_no, self.batch_no = state["seq_no"], state["batch_no"]
        self.rng.bit_generator.state = state["rng"]
        if not self.sampler.fits(state["sampler"]):
            return False
        self.sampler.load(state["sampler"])
        return True

    def _next_prompts(self, n: int) -> list[tuple[str, list[int]]]:
        return [self.prompts[i] for i in self.sampler.take(n)]

    def produce(self, n: int | None = None) -> tuple[list[bytes], dict]:
        """One batch of n prompts (default rollout.batch_size): rollout with the current weights -> encoded records."""
        cfg = self.cfg
        n = n or cfg.rollout.batch_size
        batch = self._next_prompts(n) if self.source is None else self.source(n)
        if not batch:  # no served text arrived in time (rollout.source=traffic): nothing to roll out
            return [], {"tau": 0.0, "alpha": [], "tokens": 0, "rollout_s": 0.0, "anchors": 0, "replay_s": 0.0,
                        "records": 0, "bytes": 0, "policy_version": self.policy_version, "path": "none"}  # fmt: skip
        seed = int(self.rng.integers(1 << 31))
        recs, st = self.maker.records(
            self.drafter,
            batch,
            self.policy_version,
            self.actor_id,
            self.incarnation,
            self.seq_no,
            seed,
            self.rng,
            {"batch": self.batch_no},
        )
        self.seq_no += len(recs)
        self.batch_no += 1
        data = [encode_record(r, max_bytes=cfg.cluster.max_record_bytes) for r in recs]
        stats = {
            "tau": st.tau, "alpha": st.alpha, "tokens": st.tokens, "rollout_s": st.rollout_s, "anchors": st.replay_anchors,
            "replay_s": st.replay_s, "records": len(data), "bytes": sum(map(len, data)), "policy_version": self.policy_version,
            "path": st.path,
        }  # fmt: skip
        return data, stats

    def evaluate(self, prompt_ids: list[list[int]], state: dict) -> dict:
        """Held-out tau of the weights `state` (the learner's; the rollout copy keeps its own)."""
        if self.eval_drafter is None:
            self.eval_drafter = self._copy()
        self.eval_drafter.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
        return self.maker.evaluate(self.eval_drafter, prompt_ids)

    def teacher_data(self, items: list[tuple]) -> list[bytes]:
        """SFT warm-up data, teacher-forced (encoded TeacherRecords): the target's greedy answers to (id, prompt ids)
        items, the dataset's own answers of (id, prompt ids, answer ids) items (data.answers=as_is), or
        (id, token ids, prompt length) sequences written elsewhere (`sft.sequences`) scored as they are."""
        layers = self.drafter.feature_layers
        if (
            items and len(items[0]) == 3 and isinstance(items[0][2], int)
        ):  # sft.sequences: a prompt length, not answer ids
            recs = prefill(self.target, layers, items, self.cfg.rollout.topk, feature_dtype=torch.bfloat16)
        else:
            recs = self.maker.teacher(layers, items)
        return [encode_teacher(r) for r in recs]


class RolloutActor:
    """Ray wrapper: a producing loop thread plus concurrent control calls from the driver.

    A plain class at module level: the fleet (dopd/fleet.py) makes it a Ray actor where it places it, with
    `ray.remote(**RolloutActor.RAY_OPTIONS)(RolloutActor)`, so importing this module never imports Ray and Ray's
    workers find the class by its module path.
    """

    RAY_OPTIONS = {"max_concurrency": 4}  # the loop thread + set_weights / stats / evaluate calls at the same time

    def __init__(self, cfg_dict: dict, actor_id: int, prompts, shards: list, feed=None):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        torch.set_num_threads(max(1, int(os.environ.get("DOPD_ACTOR_THREADS", "1"))))
        self.cfg = config_from_dict(cfg_dict)
        self.notes: list[str] = []  # the worker's log lines (target work's progress), relayed by the driver
        self.notes_lock = threading.Lock()
        self.worker = RolloutWorker(self.cfg, actor_id, prompts, log=self._note)
        self.feed = feed  # rollout.source=traffic: the served texts' feed (dopd/traffic.py), a Ray actor handle
        if self.cfg.rollout.source == "traffic":
            if feed is None:
                raise ValueError("rollout.source=traffic: the rollout actor was given no traffic feed")
            self.worker.source = self._take_traffic
        self.shards = shards
        self.lock = threading.Lock()  # the worker: held by the loop for a whole rollout batch
        # new weights wait here for the next batch boundary; their own lock, so that publishing never waits for
        # a rollout batch to finish (that took ~40 s per publish in the SmolLM2 demo)
        self.pending_lock = threading.Lock()
        self.pending: tuple[dict, int] | None = None
        self.weights_arrived = threading.Event()
        self.stop_flag = threading.Event()
        self.thread: threading.Thread | None = None
        self.totals = {
            "records": 0,
            "tokens": 0,
            "anchors": 0,
            "batches": 0,
            "full_waits": 0,
            "dropped": 0,
            "rejected": 0,
        }
        self.last: dict = {}
        self.error = ""
        self.put_error = ""  # the last failed put call (its records are counted as rejected)

    def _take_traffic(self, n: int) -> list[tuple]:
        """Up to n served texts from the feed (waiting ~1 s for the first), as items with given answers; the
        prompt id names the replica and the request, so opd_sequences.jsonl says where each record came from."""
        import ray

        got = ray.get(self.feed.take.remote(n, 1.0))
        return [(f"{replica or 'serve'}/{rid}", prompt, output) for rid, prompt, output, replica in got]

    def ready(self) -> dict:
        return {"actor_id": self.worker.actor_id, "incarnation": self.worker.incarnation}

    def _note(self, line: str) -> None:
        with self.notes_lock:
            self.notes.append(line)
            del self.notes[:-50]  # bounded: nobody may be asking

    def progress(self) -> list[str]:
        """The log lines since the last call (the driver prints them while it waits on this actor's target work)."""
        with self.notes_lock:
            out, self.notes = self.notes, []
        return out

    def state(self) -> dict:
        """A snapshot for a checkpoint, not waiting for the batch in progress (with cluster.rollout=async that batch's
        records are lost at a crash anyway; with sync no batch runs while the driver checkpoints)."""
        return self.worker.state()

    def load_state(self, state: dict) -> bool:
        with self.lock:
            return self.worker.load_state(state)

    def produce(self, n: int) -> tuple[list[bytes], dict]:
        """One synchronous round (`cluster.rollout=sync`): n records with the newest weights, handed back."""
        with self.lock:
            self._apply_pending()
            data, stats = self.worker.produce(n)
        self.totals["records"] += len(data)
        self.totals["tokens"] += stats["tokens"]
        self.totals["anchors"] += stats["anchors"]
        self.totals["batches"] += 1
        self.last = stats
        return data, stats

    def set_weights(self, ref_box: list, version: int) -> float:
        import ray

        t0 = time.perf_counter()
        state = ray.get(ref_box[0])
        with self.pending_lock:
            self.pending = (state, version)
        self.weights_arrived.set()
        return time.perf_counter() - t0

    def _apply_pending(self) -> None:
        """Load the newest published weights, if any; the caller holds `self.lock`."""
        with self.pending_lock:
            pending, self.pending = self.pending, None
        if pending is not None:
            self.worker.set_weights(*pending)

    def _loop(self) -> None:
        try:
            while not self.stop_flag.is_set():
                with self.lock:
                    self._apply_pending()
                    ready = self.worker.policy_version >= 0
                    if ready:
                        first = self.worker.seq_no
                        data, stats = self.worker.produce()
                if not ready:  # no weights yet: `set_weights` wakes this up
                    self.weights_arrived.wait(timeout=1.0)
                    self.weights_arrived.clear()
                    continue
                if not data:  # rollout.source=traffic and nothing was served meanwhile
                    continue
                self._push(data, first)
                self.totals["tokens"] += stats["tokens"]
                self.totals["anchors"] += stats["anchors"]
                self.totals["batches"] += 1
                self.last = stats
        except Exception:
            self.error = traceback.format_exc()[-2000:]

    def _push(self, data: list[bytes], first_seq: int) -> None:
        """Each record to the shard its sequence number picks (so a record id always lands on the same shard, which
        is what lets a shard refuse a replayed id), one batched put per shard; a full shard is waited on inside the
        put (backpressure), and a put that fails is counted, never the end of the loop."""
        import ray

        pending: dict[int, list[bytes]] = {}
        for j, d in enumerate(data):
            pending.setdefault((first_seq + j) % len(self.shards), []).append(d)
        while pending and not self.stop_flag.is_set():
            refs = {s: self.shards[s].put_many.remote(batch, wait_s=1.0) for s, batch in pending.items()}
            retry: dict[int, list[bytes]] = {}
            for s, ref in refs.items():
                try:
                    answers = ray.get(ref)
                except Exception as e:  # the shard failed the call (or is gone): these records are lost, counted
                    self.totals["rejected"] += len(pending[s])
                    self.put_error = f"{type(e).__name__}: {str(e)[-300:]}"
                    continue
                for d, res in zip(pending[s], answers):
                    if res == "full":
                        retry.setdefault(s, []).append(d)
                    else:
                        self.totals[
                            "dropped" if res == "dropped" else "rejected" if res == "rejected" else "records"
                        ] += 1
                if s in retry:
                    self.totals["full_waits"] += 1
            pending = retry

    def start(self) -> bool:
        if self.thread is None or not self.thread.is_alive():
            self.stop_flag.clear()
            self.thread = threading.Thread(target=self._loop, daemon=True)
            self.thread.start()
        return True

    def stop(self) -> bool:
        self.stop_flag.set()
        if self.thread is not None:
            self.thread.join(timeout=600)
        return True

    def stats(self) -> dict:
        return {
            "actor_id": self.worker.actor_id, "incarnation": self.worker.incarnation,
            "policy_version": self.worker.policy_version, "totals": dict(self.totals), "last": dict(self.last),
            "error": self.error, "put_error": self.put_error, "alive": bool(self.thread and self.thread.is_alive()),
        }  # fmt: skip

    def evaluate(self, ref_box: list, prompt_ids: list[list[int]]) -> dict:
        import ray

        state = ray.get(ref_box[0])
        with self.lock:
            return self.worker.evaluate(prompt_ids, state)

    def teacher_data(self, items) -> list[bytes]:
        with self.lock:
            return self.worker.teacher_data(items)

    def pid(self) -> int:
        return os.getpid()
