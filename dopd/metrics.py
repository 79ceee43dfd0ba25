"""Every metric the job exports, in one place (prometheus-client), on one /metrics endpoint per job.

Dashboards (`dashboards/`) import `METRICS` from here, so a panel can only reference a name that exists, and the
end-to-end test queries every panel expression through a real Prometheus. The driver process owns the endpoint:
actors, shards and learner ranks report their numbers back to it with their regular results, so one scrape
target sees the whole job. Labels: `actor`, `shard`, `position` (1-based block position), `stream`, `source`.
The same updates also go to TensorBoard / W&B when a run turns them on (`dopd/sinks.py`), under these names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


@dataclass(frozen=True)
class MetricDef:
    name: str  # exported name (counters get `_total` appended by Prometheus conventions: use `series`)
    kind: str  # gauge | counter | histogram
    doc: str
    labels: tuple[str, ...] = ()

    @property
    def series(self) -> str:
        """The series name PromQL sees (counters end in _total; histograms are queried via _bucket/_sum/_count)."""
        return self.name + "_total" if self.kind == "counter" else self.name


_DEFS = [
    MetricDef("dopd_heldout_tau", "gauge", "Held-out acceptance length tau (tokens per verification step)"),
    MetricDef("dopd_rollout_tau", "gauge", "Acceptance length of the latest rollout batch, per actor", ("actor",)),
    MetricDef(
        "dopd_acceptance_rate",
        "gauge",
        "Acceptance rate at a block position given the earlier ones accepted",
        ("source", "position"),
    ),
    MetricDef("dopd_rollout_tokens", "counter", "Tokens committed by rollout, per actor", ("actor",)),
    MetricDef(
        "dopd_rollout_tokens_per_second", "gauge", "Rollout throughput of the latest batch, per actor", ("actor",)
    ),
    MetricDef("dopd_replay_anchors", "counter", "Error positions replayed, per actor", ("actor",)),
    MetricDef(
        "dopd_replay_anchors_per_second", "gauge", "Replay throughput of the latest batch, per actor", ("actor",)
    ),
    MetricDef("dopd_queue_depth", "gauge", "Records waiting in a queue shard", ("shard",)),
    MetricDef("dopd_queue_bytes", "gauge", "Bytes waiting in a queue shard", ("shard",)),
    MetricDef(
        "dopd_record_staleness",
        "histogram",
        "Policy versions between a record's producer and the learner that trains on it",
    ),
    MetricDef("dopd_learner_loss", "gauge", "Learner loss per stream (total, accepted, rejected)", ("stream",)),
    MetricDef("dopd_learner_grad_norm", "gauge", "Gradient norm before clipping"),
    MetricDef(
        "dopd_learner_grad_norm_part",
        "gauge",
        "Gradient norm before clipping of the drafter's own head vs the rest",
        ("part",),
    ),
    MetricDef(
        "dopd_learner_silenced_share",
        "gauge",
        "Share of a stream's positions whose gradient a floor, clip or the loss clamp zeroes",
        ("stream",),
    ),
    MetricDef(
        "dopd_replay_kl",
        "gauge",
        "Replay mismatch: KL(drafter || target) over the full vocabulary per group of block positions",
        ("group",),
    ),
    MetricDef("dopd_learner_step_seconds", "histogram", "Wall time of one learner optimizer step"),
    MetricDef("dopd_learner_steps", "counter", "Learner optimizer steps"),
    MetricDef("dopd_learner_flops", "counter", "Learner FLOPs (forward + backward, counted by PyTorch)"),
    MetricDef("dopd_policy_version", "gauge", "Current published policy version"),
    MetricDef(
        "dopd_publish_latency_seconds",
        "histogram",
        "Time to gather new drafter weights and hand them to every actor (each loads them at its next rollout batch)",
    ),
    MetricDef("dopd_records_produced", "counter", "Experience records produced, per actor", ("actor",)),
    MetricDef("dopd_records_consumed", "counter", "Experience records trained on"),
    MetricDef("dopd_records_dropped_stale", "counter", "Records dropped for staleness, per shard", ("shard",)),
    MetricDef(
        "dopd_records_dropped_full", "counter", "Records dropped by a full shard (drop policies), per shard", ("shard",)
    ),
    MetricDef("dopd_records_rejected", "counter", "Malformed records rejected, per shard", ("shard",)),
    MetricDef("dopd_actor_restarts", "counter", "Rollout actor restarts, per actor", ("actor",)),
    # rollout.source=traffic (`dopd serve --learn`): what the traffic feed did with the served requests
    MetricDef("dopd_traffic_taken", "counter", "Served requests handed to the learning actors"),
    MetricDef("dopd_traffic_dropped", "counter", "Served requests the traffic feed dropped (buffer full or malformed)"),
    MetricDef("dopd_traffic_waiting", "gauge", "Served requests waiting in the traffic feed"),
]
METRICS: dict[str, MetricDef] = {d.name: d for d in _DEFS}

# `dopd serve`: each replica's own registry (dopd/serve.py ReplicaMetrics), every series labelled `replica`; kept
# here beside the job's so the serving dashboard can only name what a replica exports
_SERVE_DEFS = [
    MetricDef("dopd_serve_requests", "counter", "HTTP requests answered", ("replica", "endpoint", "status")),
    MetricDef("dopd_serve_generated_tokens", "counter", "Tokens generated", ("replica",)),
    MetricDef("dopd_serve_verification_steps", "counter", "Verification steps (one per row per step)", ("replica",)),
    MetricDef("dopd_serve_accepted_drafts", "counter", "Draft tokens accepted", ("replica",)),
    MetricDef(
        "dopd_serve_accepted_at_position",
        "counter",
        "Verification steps whose draft at this block position was accepted",
        ("replica", "position"),
    ),
    MetricDef("dopd_serve_tau", "gauge", "Tokens per verification step over the last row-steps", ("replica",)),
    MetricDef("dopd_serve_ttft_seconds", "histogram", "Time to first token", ("replica",)),
    MetricDef("dopd_serve_request_seconds", "histogram", "Request latency", ("replica",)),
    MetricDef("dopd_serve_token_seconds", "histogram", "Per-token latency after the first", ("replica",)),
    MetricDef("dopd_serve_in_flight", "gauge", "Requests in flight", ("replica",)),
    MetricDef("dopd_serve_policy_version", "gauge", "Drafter weights version in use", ("replica",)),
    MetricDef("dopd_serve_records_offered", "counter", "Finished requests offered to learning", ("replica",)),
]
SERVE_METRICS: dict[str, MetricDef] = {d.name: d for d in _SERVE_DEFS}
SERVE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)  # seconds, for the serving histograms


def collector(d: MetricDef, registry: CollectorRegistry, buckets: tuple[float, ...] = ()):
    """The prometheus-client collector of one definition on `registry`."""
    if d.kind == "gauge":
        return Gauge(d.name, d.doc, d.labels, registry=registry)
    if d.kind == "counter":
        return Counter(d.name, d.doc, d.labels, registry=registry)
    return Histogram(d.name, d.doc, d.labels, buckets=buckets, registry=registry)


# the job's state that the driver sets on the collectors directly: written to the sinks at every learner step
_EVERY_STEP = (
    "dopd_policy_version", "dopd_queue_depth", "dopd_queue_bytes", "dopd_publish_latency_seconds", "dopd_records_dropped_stale",
    "dopd_records_dropped_full", "dopd_records_rejected", "dopd_actor_restarts", "dopd_traffic_taken",
    "dopd_traffic_dropped", "dopd_traffic_waiting",
)  # fmt: skip


def series_tag(series: str, labels: dict[str, str]) -> str:
    """A Prometheus series as one flat name for TensorBoard / W&B: `name{a="x",b="y"}` -> `name/a=x,b=y`."""
    return series + ("/" + ",".join(f"{k}={v}" for k, v in labels.items()) if labels else "")


_BUCKETS = {
    "dopd_record_staleness": (0, 1, 2, 3, 4, 6, 8, 16),
    "dopd_learner_step_seconds": (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
    "dopd_publish_latency_seconds": (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
}


class JobMetrics:
    """The job's collectors on a private registry (so tests can build several) plus its HTTP endpoint."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.m: dict[str, object] = {}
        for d in _DEFS:
            self.m[d.name] = collector(d, self.registry, _BUCKETS.get(d.name, ()))
        self.server = None
        self.port: int | None = None
        self.sinks = None  # TensorBoard / W&B (dopd/sinks.py), fed by the typed updates below
        self.step: Callable[[], int] = lambda: 0

    def attach(self, sinks, step: Callable[[], int]) -> None:
        """Also hand every typed update's series to `sinks` (with `.write(step, values)`), at the step `step()`."""
        self.sinks, self.step = sinks, step

    def _emit(self, names: tuple[str, ...], **labels: str) -> None:
        """The current value of these metrics' series (those with `labels`) to the sinks, named as Prometheus
        exports them: counters as `_total`, histograms as `_sum` and `_count`."""
        if self.sinks is None:
            return
        values = {}
        for fam in self.registry.collect():
            if fam.name not in names:
                continue
            for s in fam.samples:
                if s.name.endswith(("_created", "_bucket")) or any(s.labels.get(k) != v for k, v in labels.items()):
                    continue
                values[series_tag(s.name, s.labels)] = float(s.value)
        if values:
            self.sinks.write(self.step(), values)

    def __getitem__(self, name: str):
        return self.m[name]

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Start the /metrics endpoint; returns the bound port (port 0 = any free port)."""
        self.server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = self.server.server_port
        return self.port

    def close(self) -> None:
        if self.sinks is not None:
            self.sinks.close()
            self.sinks = None
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    # --- typed updates used by the runners --------------------------------------------------------------------
    def acceptance(self, source: str, alpha: list[float]) -> None:
        for i, a in enumerate(alpha, 1):
            self.m["dopd_acceptance_rate"].labels(source=source, position=str(i)).set(a)
        self._emit(("dopd_acceptance_rate",), source=source)

    def rollout(
        self,
        actor: str,
        tau: float,
        alpha: list[float],
        tokens: int,
        seconds: float,
        anchors: int,
        replay_seconds: float,
        records: int,
    ) -> None:
        self.m["dopd_rollout_tau"].labels(actor=actor).set(tau)
        self.acceptance("rollout", alpha)
        self.m["dopd_rollout_tokens"].labels(actor=actor).inc(tokens)
        self.m["dopd_rollout_tokens_per_second"].labels(actor=actor).set(tokens / max(seconds, 1e-9))
        self.m["dopd_replay_anchors"].labels(actor=actor).inc(anchors)
        self.m["dopd_replay_anchors_per_second"].labels(actor=actor).set(anchors / max(replay_seconds, 1e-9))
        self.m["dopd_records_produced"].labels(actor=actor).inc(records)
        self._emit(
            (
                "dopd_rollout_tau",
                "dopd_rollout_tokens",
                "dopd_rollout_tokens_per_second",
                "dopd_replay_anchors",
                "dopd_replay_anchors_per_second",
                "dopd_records_produced",
            ),
            actor=actor,
        )

    def learner(
        self,
        loss: float,
        acc: float,
        rej: float,
        grad_norm: float,
        seconds: float,
        flops: float,
        records: int,
        staleness: list[int],
    ) -> None:
        self.m["dopd_learner_loss"].labels(stream="total").set(loss)
        self.m["dopd_learner_loss"].labels(stream="accepted").set(acc)
        self.m["dopd_learner_loss"].labels(stream="rejected").set(rej)
        self.m["dopd_learner_grad_norm"].set(grad_norm)
        self.m["dopd_learner_step_seconds"].observe(seconds)
        self.m["dopd_learner_steps"].inc()
        self.m["dopd_learner_flops"].inc(flops)
        self.m["dopd_records_consumed"].inc(records)
        for s in staleness:
            self.m["dopd_record_staleness"].observe(s)
        self._emit(
            (
                "dopd_learner_loss",
                "dopd_learner_grad_norm",
                "dopd_learner_step_seconds",
                "dopd_learner_steps",
                "dopd_learner_flops",
                "dopd_records_consumed",
                "dopd_record_staleness",
            )
            + _EVERY_STEP
        )

    def diagnostics(self, row: dict) -> None:
        """A learner step's diagnostics (learner/diagnostics.py), those the row has: head / body gradient norms,
        silenced shares per stream, replay-mismatch KL per group, acceptance per draft position of the trained blocks."""
        names = []
        for part in ("head", "body"):
            if f"grad_norm_{part}" in row:
                self.m["dopd_learner_grad_norm_part"].labels(part=part).set(row[f"grad_norm_{part}"])
                names.append("dopd_learner_grad_norm_part")
        for stream, key in (("accepted", "acc_silenced"), ("rejected", "rej_silenced")):
            if row.get(key) is not None:
                self.m["dopd_learner_silenced_share"].labels(stream=stream).set(row[key])
                names.append("dopd_learner_silenced_share")
        for group in ("matched", "accepted", "first_rejected", "post_rejection"):
            if row.get(f"replay_kl_{group}") is not None:
                self.m["dopd_replay_kl"].labels(group=group).set(row[f"replay_kl_{group}"])
                names.append("dopd_replay_kl")
        if names:
            self._emit(tuple(set(names)))
        alpha = row.get("alpha_trained")
        if alpha and all(a is not None for a in alpha):
            self.acceptance("trained", alpha)
        elif alpha:
            for i, a in enumerate(alpha, 1):
                if a is not None:
                    self.m["dopd_acceptance_rate"].labels(source="trained", position=str(i)).set(a)
            self._emit(("dopd_acceptance_rate",), source="trained")

    def observe(self, row: dict) -> None:
        """A row the training loop wrote to metrics.jsonl, as the typed updates: the one path from a run's rows to
        Prometheus and the sinks, for both runners (dopd/train.py hands every row to its backend's `observe`)."""
        ev = row.get("event")
        if ev == "step":
            self.m["dopd_policy_version"].set(row["policy_version"])
            self.learner(
                row["loss"], row["acc_div"], row["rej_div"], row["grad_norm"], row["seconds"], row["step_flops"],
                row["records"], row["staleness"],
            )  # fmt: skip
            self.diagnostics(row)
        elif ev == "rollout":
            self.rollout(
                str(row["actor"]), row["rollout_tau"], row["rollout_alpha"], row["rollout_tokens"], row["rollout_s"],
                row["replay_anchors"], row["replay_s"], row["records"],
            )  # fmt: skip
        elif ev == "eval":
            self.heldout(row["tau"], row["alpha"])

    def heldout(self, tau: float, alpha: list[float]) -> None:
        self.m["dopd_heldout_tau"].set(tau)
        self._emit(("dopd_heldout_tau",))
        self.acceptance("heldout", alpha)
