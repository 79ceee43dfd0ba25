"""`dopd serve`: an OpenAI-compatible endpoint on Ray Serve, each replica holding the target and a drafter copy.

Why Ray Serve: it already does what a server of our own would have to (HTTP proxy, replicas, restarting a dead
replica, back-pressure), on the Ray the rest of dopd runs on; its FastAPI ingress gives the routes. What is ours is
only the replica: an `EngineLoop` (dopd/serve_loop.py) that batches concurrent requests in one `DecodeBatch` per
sampling setting, admitting and releasing rows between engine steps.

Security: loopback by default. Any other host needs an API key (a file, or DOPD_API_KEY; never argv, where `ps`
shows it); replicas get only its SHA-256, so the key itself never enters Ray's control store.

`--learn` (the lead's dopd/traffic.py): replicas look up a Ray actor `feed_name` in namespace `feed_namespace`,
offer it each finished request's token ids (fire and forget: serving never waits), and poll `latest()` for newer
drafter weights, swapped in between engine steps.
"""

# no `from __future__ import annotations`: Serve's ingress wraps the route methods, and FastAPI must resolve
# their `Request` annotations as real classes (as strings they resolve in the wrapper's module and the routes 422)
import asyncio
import hashlib
import hmac
import os
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from dopd.common.errors import DopdError
from dopd.openai_api import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    Usage,
    completion_body,
    new_id,
    parse,
    sse,
    usage_chunk,
)

APP_NAME = "dopd"
KEY_ENV = "DOPD_API_KEY"


@dataclass
class ServeOptions:
    """Everything a replica needs (pickled into the deployment: no secrets here, the key travels as a hash)."""

    target: str
    drafter: str | None = None  # a drafter directory, init-<kind>, or None: the target alone (block size 0)
    replicas: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str | None = None  # the `model` clients name (default: the target's name)
    block_size: int = 4
    batch_size: int = 8  # rows per DecodeBatch
    max_batches: int = 4  # distinct (temperature, top_p) batches a replica steps at once
    max_prompt_tokens: int = 1024
    max_tokens: int = 256  # the largest max_tokens a request may ask for
    default_max_tokens: int = 16  # OpenAI's default for /v1/completions
    max_body_bytes: int = 1 << 20
    max_concurrent: int = 32  # in-flight requests per replica; more get 429
    dtype: str = "float32"
    threads: int = 1  # torch threads per replica
    replica_num_cpus: float = 1.0
    feed_name: str | None = None
    feed_namespace: str = "dopd"
    # where each replica registers its own /metrics for Prometheus (file_sd; `start` fills in prom_targets_dir())
    prom_targets: str | None = None


def is_loopback_host(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def read_api_key(path: Path | None) -> str | None:
    """The API key from `path`, else from DOPD_API_KEY, else None."""
    if path is not None:
        try:
            key = Path(path).read_text().strip()
        except OSError as e:
            raise DopdError(f"cannot read the API key file {path}: {e}") from e
        if not key:
            raise DopdError(f"the API key file {path} is empty")
        return key
    return os.environ.get(KEY_ENV) or None


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond loopback without a key: the server would run any client's prompts on this machine."""
    if not is_loopback_host(host) and not api_key:
        raise DopdError(
            f"refusing to serve on {host} without an API key: anyone who can reach it could use the target. "
            f"Give one with --api-key-file FILE or the {KEY_ENV} environment variable (never on the command line), "
            "or keep the default --host 127.0.0.1"
        )


def key_hash(key: str | None) -> str | None:
    return hashlib.sha256(key.encode()).hexdigest() if key else None


class ReplicaMetrics:
    """This replica's Prometheus series (its own registry, every series labelled with the replica id)."""

    def __init__(self, replica: str, K: int, window: int = 512):
        from prometheus_client import CollectorRegistry

        from dopd.metrics import SERVE_BUCKETS, SERVE_METRICS, collector

        self.registry = r = CollectorRegistry()
        self.replica = replica
        c = {name: collector(d, r, SERVE_BUCKETS) for name, d in SERVE_METRICS.items()}
        self.requests, self.tokens = c["dopd_serve_requests"], c["dopd_serve_generated_tokens"]
        self.steps, self.accepted = c["dopd_serve_verification_steps"], c["dopd_serve_accepted_drafts"]
        self.accepted_at, self.tau = c["dopd_serve_accepted_at_position"], c["dopd_serve_tau"]
        self.ttft, self.latency = c["dopd_serve_ttft_seconds"], c["dopd_serve_request_seconds"]
        self.per_token, self.in_flight = c["dopd_serve_token_seconds"], c["dopd_serve_in_flight"]
        self.policy, self.offered = c["dopd_serve_policy_version"], c["dopd_serve_records_offered"]
        # every position's series exists from the start (at 0): "nothing accepted at position 4 yet" is data
        for i in range(1, K + 1):
            self.accepted_at.labels(replica, str(i))
        for m in (self.tokens, self.steps, self.accepted, self.in_flight, self.policy, self.offered):
            m.labels(replica)
        self.window: deque[int] = deque(maxlen=window)
        self.K = K

    def on_step(self, events, K: int) -> None:
        rid = self.replica
        for ev in events:
            self.steps.labels(rid).inc()
            self.accepted.labels(rid).inc(ev.accepted)
            self.tokens.labels(rid).inc(len(ev.new_tokens))
            for i in range(ev.accepted):
                self.accepted_at.labels(rid, str(i + 1)).inc()
            self.window.append(ev.accepted + 1)
        if self.window:
            self.tau.labels(rid).set(sum(self.window) / len(self.window))

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def announce(self, host: str, app_port: int, targets_dir: str) -> None:
        """This replica's own /metrics endpoint (a free port on `host`), registered for Prometheus as
        `serve-<app port>-<replica>` with `run="serve"`: one scrape target per replica, because the app's /metrics
        answers for whichever replica the proxy picks, and series that come and go between scrapes of one target
        are marked stale."""
        from prometheus_client import start_http_server

        from dopd.prometheus import register_job_target

        self.server, _ = start_http_server(0, addr=host, registry=self.registry)
        self.target = (f"serve-{app_port}-{self.replica}", targets_dir)
        register_job_target(self.target[0], host, self.server.server_port, {"run": "serve"}, targets_dir=targets_dir)

    def withdraw(self) -> None:
        from dopd.prometheus import unregister_job_target

        if getattr(self, "target", None):
            unregister_job_target(*self.target)
            self.target = None
        if getattr(self, "server", None) is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


app = FastAPI(title="dopd serve", docs_url=None, redoc_url=None)


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


@serve.deployment(name="DopdServer", health_check_period_s=2, health_check_timeout_s=30)
@serve.ingress(app)
class DopdServer:
    """One replica: the target, a drafter copy, the engine loop, and the OpenAI routes."""

    def __init__(self, opts: ServeOptions, api_key_sha256: str | None = None):
        import torch

        from dopd.common.drafters import drafter_for_target
        from dopd.common.models import load_target
        from dopd.common.specdec import SpecEngine
        from dopd.serve_loop import EngineLoop

        torch.set_num_threads(max(1, opts.threads))
        self.opts = opts
        self.key_sha = api_key_sha256
        self.target = load_target(opts.target, dtype=opts.dtype, quiet=True)
        drafter = drafter_for_target(opts.drafter, self.target) if opts.drafter else None
        self.engine = SpecEngine(self.target, drafter)
        self.K = opts.block_size if drafter is not None else 0
        self.tok = self.target.tokenizer
        self.context = self.target.info.max_positions
        self.model_name = opts.model_name or opts.target
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # constructed outside Serve (a unit test)
            self.replica = f"pid{os.getpid()}"
        self.metrics = ReplicaMetrics(self.replica, self.K)
        max_len = opts.max_prompt_tokens + opts.max_tokens + 2 * (self.K + 1) + 2
        self.loop = EngineLoop(
            self.engine, self.tok, self.K, opts.batch_size, max_len, opts.max_batches,
            on_finish=self._finished, on_step=self.metrics.on_step,
        )  # fmt: skip
        self.metrics.in_flight.labels(self.replica).set_function(self.loop.in_flight)
        if opts.prom_targets:  # loopback only: a local Prometheus (`dopd cluster up --with-prometheus`) scrapes it
            self.metrics.announce("127.0.0.1", opts.port, opts.prom_targets)
        self.started = time.time()
        self.feed = None
        self.policy_version = 0
        self.feed_version = -1  # the newest feed version swapped in (the feed says -1 before its first publish)
        if opts.feed_name:
            threading.Thread(target=self._follow_feed, name="dopd-feed", daemon=True).start()

    # --- Serve hooks and handle methods ----------------------------------------------------------------------
    def __del__(self) -> None:
        """Serve calls this when it stops the replica: withdraw its Prometheus target."""
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.withdraw()

    def check_health(self) -> None:
        """Serve restarts a replica whose check fails: the engine thread died or raised."""
        if self.loop.error is not None or not self.loop.thread.is_alive():
            raise RuntimeError(f"the engine loop stopped: {self.loop.error!r}")

    def set_drafter_weights(self, state_dict: dict, version: int | None = None) -> int:
        """New drafter weights (tensors or numpy arrays), swapped in before the next engine step."""
        import torch

        sd = {k: torch.as_tensor(v) for k, v in state_dict.items()}
        self.loop.set_drafter_weights(sd)
        self.policy_version = version if version is not None else self.policy_version + 1
        self.metrics.policy.labels(self.replica).set(self.policy_version)
        return self.policy_version

    def info(self) -> dict:
        return {
            "replica": self.replica,
            "pid": os.getpid(),
            "steps": self.loop.steps,
            "weights_version": self.engine.weights_version,
            "policy_version": self.policy_version,
            "in_flight": self.loop.in_flight(),
        }

    # --- --learn: the traffic feed ---------------------------------------------------------------------------
    def _follow_feed(self) -> None:
        import ray

        while self.feed is None:
            try:
                self.feed = ray.get_actor(self.opts.feed_name, namespace=self.opts.feed_namespace)
            except ValueError:
                time.sleep(1.0)
        while True:
            try:
                version, box = ray.get(self.feed.latest.remote(), timeout=30)
                if box and version > self.feed_version:
                    self.set_drafter_weights(ray.get(box[0], timeout=60), version)
                    self.feed_version = version
            except Exception:  # a learner or feed restart: serving goes on, the next poll retries
                pass
            time.sleep(1.0)

    def _finished(self, r) -> None:
        m = self.metrics
        now = time.perf_counter()
        m.latency.labels(self.replica).observe(now - r.submitted)
        if r.first_token_at is not None:
            m.ttft.labels(self.replica).observe(r.first_token_at - r.submitted)
            if len(r.output_ids) > 1:
                m.per_token.labels(self.replica).observe((now - r.first_token_at) / (len(r.output_ids) - 1))
        if self.feed is not None and r.learn and r.output_ids:
            rec = {"id": r.rid, "prompt": list(r.prompt_ids), "output": list(r.output_ids), "replica": self.replica}
            self.feed.offer.remote([rec])  # fire and forget: never waited on
            m.offered.labels(self.replica).inc()

    # --- routes ----------------------------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        if self.key_sha is None:
            return
        got = request.headers.get("authorization", "")
        token = got[7:] if got.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(hashlib.sha256(token.encode()).hexdigest(), self.key_sha):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer ...)", type="authentication_error",
                           code="invalid_api_key")  # fmt: skip

    async def _body(self, request: Request) -> bytes:
        limit = self.opts.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body of {declared} bytes is over the limit of {limit} bytes (--max-body-bytes)",
                           code="body_too_large")  # fmt: skip
        body = await request.body()
        if len(body) > limit:
            raise ApiError(413, f"request body of {len(body)} bytes is over the limit of {limit} bytes (--max-body-bytes)",
                           code="body_too_large")  # fmt: skip
        return body

    @app.get("/health")
    def health(self):
        if self.loop.error is not None:
            return JSONResponse({"status": "error", "error": repr(self.loop.error)}, status_code=503)
        return {"status": "ok", **self.info()}

    @app.get("/metrics")
    def metrics_route(self):
        return Response(self.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    def models(self, request: Request):
        try:
            self._auth(request)
        except ApiError as e:
            return _error(e)
        card = {"id": self.model_name, "object": "model", "created": int(self.started), "owned_by": "dopd"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._serve(request, chat=True)

    def _encode(self, req, chat: bool) -> list[int]:
        if chat:
            msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
            ids = self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
            return list(ids)
        p = req.prompt_input()
        if isinstance(p, str):
            return list(self.tok.encode(p, add_special_tokens=False))
        V = self.target.info.vocab_size
        bad = [t for t in p if not isinstance(t, int) or not 0 <= t < V]
        if bad:
            raise ApiError(400, f"prompt token id {bad[0]} is outside the vocabulary [0, {V})", param="prompt")
        return list(p)

    def _check(self, req, ids: list[int]) -> int:
        o = self.opts
        budget = req.token_budget(o.default_max_tokens if not isinstance(req, ChatRequest) else min(o.max_tokens, 256))
        if budget > o.max_tokens:
            raise ApiError(400, f"max_tokens {budget} is over this server's limit of {o.max_tokens} (dopd serve --max-tokens)",
                           param="max_tokens", code="max_tokens_limit")  # fmt: skip
        need = len(ids) + budget + self.K + 1
        if need > self.context:
            raise ApiError(400, f"this model's context is {self.context} tokens; the request needs {need} ({len(ids)} in "
                           f"the prompt, {budget} max_tokens, {self.K + 1} verification slots)", param="messages"
                           if isinstance(req, ChatRequest) else "prompt", code="context_length_exceeded")  # fmt: skip
        if len(ids) > o.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(ids)} tokens, over this server's limit of {o.max_prompt_tokens} "
                           "(dopd serve --max-prompt-tokens)", param="prompt", code="prompt_too_long")  # fmt: skip
        if len(ids) < 2:
            raise ApiError(400, f"the prompt has {len(ids)} token(s); at least 2 are needed", param="prompt",
                           code="prompt_too_short")  # fmt: skip
        if self.loop.in_flight() >= o.max_concurrent:
            raise ApiError(429, f"too many concurrent requests: this replica's limit is {o.max_concurrent} "
                           "(dopd serve --max-concurrent); retry later", type="rate_limit_error",
                           code="concurrent_requests_limit")  # fmt: skip
        return budget

    async def _serve(self, request: Request, chat: bool):
        endpoint = "chat" if chat else "completions"
        try:
            self._auth(request)
            body = await self._body(request)
            req = parse(body, ChatRequest if chat else CompletionRequest)
            if req.model != self.model_name:
                raise ApiError(404, f"the model '{req.model}' does not exist: this server serves '{self.model_name}' "
                               "(GET /v1/models)", param="model", code="model_not_found")  # fmt: skip
            stops = req.stop_list()
            ids = self._encode(req, chat)
            budget = self._check(req, ids)
        except ApiError as e:
            self.metrics.requests.labels(self.replica, endpoint, str(e.status)).inc()
            return _error(e)
        from dopd.serve_loop import GenRequest

        learn = req.dopd_learn and request.headers.get("x-dopd-learn", "1").lower() not in ("0", "false", "no")
        g = GenRequest(ids, budget, req.temperature, req.top_p, stops, asyncio.get_running_loop(),
                       rid=new_id("chatcmpl" if chat else "cmpl"), learn=learn)  # fmt: skip
        self.loop.submit(g)
        self.metrics.requests.labels(self.replica, endpoint, "200").inc()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._stream(g, chat, include_usage), media_type="text/event-stream")
        try:
            text = []
            while True:
                delta, done = await g.events.get()
                text.append(delta)
                if done:
                    break
        finally:
            if g.finish is None:
                g.cancelled = True  # the client went away: free the row
        if g.finish == "error":
            return _error(ApiError(500, f"the engine failed: {self.loop.error!r}", type="server_error"))
        usage = Usage(len(ids), len(g.output_ids))
        return completion_body(g.rid, self.model_name, "".join(text), g.finish, usage, chat)

    async def _stream(self, g, chat: bool, include_usage: bool):
        try:
            while True:
                delta, done = await g.events.get()
                if delta or not done:
                    yield sse(completion_body(g.rid, self.model_name, delta, None, None, chat, chunk=True))
                if done:
                    break
            if g.finish == "error":
                yield sse(ApiError(500, f"the engine failed: {self.loop.error!r}", type="server_error").body())
            else:
                last = completion_body(g.rid, self.model_name, "", g.finish, None, chat, chunk=True)
                if chat:
                    last["choices"][0]["delta"] = {}
                yield sse(last)
                if include_usage:
                    yield sse(usage_chunk(g.rid, self.model_name, Usage(len(g.prompt_ids), len(g.output_ids)), chat))
            yield sse("[DONE]")
        finally:
            if g.finish is None:
                g.cancelled = True


def _ensure_ray(opts: ServeOptions) -> None:
    import ray

    if ray.is_initialized():
        return
    from dopd.common.load import load_config
    from dopd.connection import connect

    cfg = load_config(None, [f"cluster.actors={opts.replicas}", f"cluster.actor_num_cpus={opts.replica_num_cpus}"])
    connect(cfg)


def start(opts: ServeOptions, api_key: str | None = None) -> str:
    """Start (or redeploy) the Serve app; returns its base URL. Joins the running Ray, else starts a local one."""
    check_bind(opts.host, api_key)
    if opts.replicas < 1:
        raise DopdError(f"--replicas must be >= 1 (got {opts.replicas})")
    if opts.prom_targets is None:
        from dopd.paths import prom_targets_dir

        opts = replace(opts, prom_targets=str(prom_targets_dir()))
    _ensure_ray(opts)
    _started.append((opts.port, opts.prom_targets))
    serve.start(http_options={"host": opts.host, "port": opts.port})
    dep = DopdServer.options(
        num_replicas=opts.replicas,
        ray_actor_options={"num_cpus": opts.replica_num_cpus},
        max_ongoing_requests=opts.max_concurrent * 2,  # our own limit answers 429 before Serve would queue
    )
    serve.run(dep.bind(opts, key_hash(api_key)), name=APP_NAME, route_prefix="/", blocking=False)
    host = f"[{opts.host}]" if ":" in opts.host else opts.host
    return f"http://{host}:{opts.port}"


def wait_running(timeout: float = 600.0, poll: float = 0.5) -> None:
    """Until every replica of the app is up (its target loaded): `--learn` plans its learners over the CPUs the
    replicas left free, so it must not plan before they hold theirs."""
    from ray.serve.schema import ApplicationStatus

    deadline = time.time() + timeout
    while True:
        app = serve.status().applications.get(APP_NAME)
        if app is not None and app.status == ApplicationStatus.RUNNING:
            return
        if app is not None and app.status in (ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.UNHEALTHY):
            raise DopdError(f"the Serve app failed to start ({app.status}): {app.message[-2000:]}")
        if time.time() > deadline:
            raise DopdError(f"the Serve app was not running after {timeout:.0f} s ({app.status if app else 'absent'})")
        time.sleep(poll)


_started: list[tuple[int, str]] = []  # (port, Prometheus targets dir) of the apps this process started


def stop() -> None:
    """Take the app down and stop Serve (the Ray it ran on stays up). Replicas withdraw their Prometheus targets as
    they stop; any a killed replica left behind are removed here."""
    serve.delete(APP_NAME)
    serve.shutdown()
    while _started:
        port, targets = _started.pop()
        for leftover in Path(targets).glob(f"serve-{port}-*.json"):
            leftover.unlink(missing_ok=True)


def handle():
    """The app's deployment handle (set_drafter_weights / info on one replica)."""
    return serve.get_app_handle(APP_NAME)


def describe(opts: ServeOptions) -> dict:
    return asdict(opts)
