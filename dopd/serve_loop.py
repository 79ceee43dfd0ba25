"""One replica's engine loop: requests join the running batch between steps and leave when they finish.

Why a thread and not asyncio: a step is a few hundred milliseconds of torch work that holds no Python lock worth
sharing; the HTTP side (Ray Serve's event loop) only puts requests into a queue and reads each request's own
asyncio queue, so it keeps answering (health, metrics, new requests) while the engine computes.

Requests at the same sampling settings (temperature, top_p) share one `DecodeBatch`; other settings get their own
batch, stepped in turn with the first (at most `max_batches` at a time; a batch is dropped when it empties). The
drafter's weights are swapped only here, between steps, so no step ever mixes two policies.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from dopd.common.specdec import DecodeBatch, DecodeSettings, SeqResult, SpecEngine


@dataclass
class GenRequest:
    """A request inside the replica: token ids in, text deltas out through `events` (read on the HTTP loop)."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # decoded output, cut at a stop string
    sent: int = 0  # characters of `text` already handed out
    finish: str | None = None
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    result: SeqResult | None = None
    rid: str = ""
    learn: bool = False  # offered to the learning feed when finished (`--learn`, unless the request opted out)

    def emit(self, delta: str, done: bool) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (delta, done))


def hold_back(text: str, stops: list[str]) -> int:
    """How many trailing characters may be the start of a stop string (not streamed until it is decided)."""
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = max(keep, k)
                break
    return keep


class EngineLoop:
    """The background loop of one replica."""

    def __init__(self, engine: SpecEngine, tokenizer, block_size: int, batch_size: int, max_len: int,
                 max_batches: int = 4, on_finish=None, on_step=None):  # fmt: skip
        self.engine = engine
        self.tokenizer = tokenizer
        self.block_size = block_size if engine.drafter is not None else 0
        self.batch_size = batch_size
        self.max_len = max_len
        self.max_batches = max_batches
        self.on_finish = on_finish  # (GenRequest) -> None, on the engine thread
        self.on_step = on_step  # (events, K) -> None, on the engine thread
        self.incoming: queue.Queue[GenRequest] = queue.Queue()
        self.waiting: deque[GenRequest] = deque()
        self.batches: dict[tuple[float, float], DecodeBatch] = {}
        self.owner: dict[int, GenRequest] = {}  # id(request) -> request, for the rows in a batch
        self._weights: list[dict] = []
        self._lock = threading.Lock()
        self.steps = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="dopd-engine", daemon=True)
        self.thread.start()

    # --- called from the HTTP side ---------------------------------------------------------------------------
    def submit(self, req: GenRequest) -> None:
        self.incoming.put(req)

    def set_drafter_weights(self, state_dict: dict) -> None:
        """Queue new drafter weights; the loop swaps them in before its next step (serving never waits)."""
        with self._lock:
            self._weights = [state_dict]  # only the newest matters

    def in_flight(self) -> int:
        return len(self.owner) + len(self.waiting) + self.incoming.qsize()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=10)

    # --- the engine thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._apply_weights()
                self._admit(block=not self.owner)
                self._cancel_gone()
                for key in list(self.batches):
                    b = self.batches[key]
                    if b.num_rows:
                        self._handle(b, b.step())
                    if not b.num_rows:
                        del self.batches[key]
        except BaseException as e:  # a broken engine must be seen: health turns red, requests get the error
            self.error = e
            for r in list(self.owner.values()) + list(self.waiting):
                r.finish = "error"
                r.emit("", True)
            raise

    def _apply_weights(self) -> None:
        with self._lock:
            pending, self._weights = self._weights, []
        if pending and self.engine.drafter is not None:
            self.engine.set_drafter_weights(pending[-1])

    def _admit(self, block: bool) -> None:
        try:
            while True:
                self.waiting.append(
                    self.incoming.get(timeout=0.05) if block and not self.waiting else self.incoming.get_nowait()
                )
                block = False
        except queue.Empty:
            pass
        still = deque()
        while self.waiting:
            r = self.waiting.popleft()
            if r.cancelled:
                r.finish = "cancelled"
                continue
            key = (r.temperature if r.temperature > 0 else 0.0, r.top_p if r.temperature > 0 else 1.0)
            b = self.batches.get(key)
            if b is None and len(self.batches) < self.max_batches:
                s = DecodeSettings(
                    block_size=self.block_size, temperature=key[0], top_p=key[1], batch_size=self.batch_size,
                    max_new_tokens=1, seed=int(time.time_ns() % 2**31),
                )  # fmt: skip
                b = self.batches[key] = self.engine.batch(s, self.batch_size, self.max_len)
            if b is None or not b.free:
                still.append(r)
                continue
            b.join(r.prompt_ids, key=id(r), max_new_tokens=r.max_tokens)
            self.owner[id(r)] = r
        self.waiting = still

    def _cancel_gone(self) -> None:
        for rid, r in list(self.owner.items()):
            if r.cancelled:
                for b in self.batches.values():
                    if b.cancel(rid) is not None:
                        break
                del self.owner[rid]
                r.finish = "cancelled"

    def _handle(self, batch: DecodeBatch, events) -> None:
        self.steps += 1
        if self.on_step is not None:
            self.on_step(events, batch.K)
        for ev in events:
            r = self.owner.get(ev.key)
            if r is None:
                continue
            if r.first_token_at is None and ev.new_tokens:
                r.first_token_at = time.perf_counter()
            r.output_ids.extend(ev.new_tokens)
            text = self.tokenizer.decode(r.output_ids, skip_special_tokens=True)
            finish = None
            if ev.result is not None:
                finish = "stop" if ev.result.finish == "eos" else "length"
                r.result = ev.result
            cut = min((i for i in (text.find(s) for s in r.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
                if ev.result is None:
                    r.result = batch.cancel(ev.key)
            r.text = text
            end = len(text) if finish else len(text) - hold_back(text, r.stop)
            # a partial multi-byte character decodes to U+FFFD: wait for the rest of it
            while end > r.sent and text[end - 1] == "\ufffd" and not finish:
                end -= 1
            delta = text[r.sent : max(end, r.sent)]
            r.sent = max(end, r.sent)
            if finish:
                r.finish = finish
                del self.owner[ev.key]
                if self.on_finish is not None:
                    self.on_finish(r)
            if delta or finish:
                r.emit(delta, finish is not None)
