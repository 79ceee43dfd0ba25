"""The batched speculative-decoding engine: draft K, verify in one target forward, commit, repeat.

Rows are slots of a continuous batch: a row that finishes (EOS or max_new_tokens) is refilled with the next prompt
while the others keep going. Per row, position t lives in KV slot t of the target cache (`SlotCache`) and of the
drafter's state, so rows at different lengths need no padding or realignment, only a mask.

Invariant between steps: row b has `n[b]` committed tokens; the target cache holds positions < n[b]-1 (the last
committed token is the first input of the next verification), and target features are known for positions
< n[b]-1. A step feeds [x_{n-1}, d_1..d_K] at positions n-1..n-1+K; position n-1+i's logits are p for d_{i+1}
(and the bonus at i = K). With block_size 0 the same loop is plain target decoding (the baseline).

tau = tokens committed per verification step (accepted + 1, counted before EOS/length truncation);
alpha[i] = P(draft i accepted | drafts 1..i-1 accepted).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .drafters import Drafter
from .errors import PromptError
from .kvcache import SlotCache
from .models import Target
from .sampling import processed_probs, verify


@dataclass
class DecodeSettings:
    block_size: int = 4  # K; 0 = plain target decoding
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    batch_size: int = 8
    record: bool = False  # keep a verification record per step
    topk: int = 16  # target top-k kept in records
    keep_features: bool = False  # return the target features of every committed position
    # the layers of those features when no drafter defines them (plain decoding that also writes teacher data)
    feature_layers: list[int] | None = None
    # plain decoding (K = 0): return the target's top-k for the next token at every answer-predicting position, the
    # same rows a teacher-forced prefill gives (`SeqResult.topk_*`), so decoding a text can also write its teacher data
    keep_topk: bool = False
    # plain decoding (K = 0): also return the target's final normed hidden state at those positions (`SeqResult.hidden`:
    # exact full-vocabulary teacher data through the frozen head, H values per position instead of V)
    keep_hidden: bool = False
    seed: int = 0
    stop_at_eos: bool = True  # False: decode past EOS to max_new_tokens (the greedy-text cache's lookahead)
    # T > 0 only: "rejection" = drafts sampled from q, accepted with min(1, p/q); "match" = greedy drafts, accepted
    # iff equal to the target's own sample (both lossless; `sampling.verify`)
    acceptance: str = "rejection"


@dataclass
class StepRecord:
    """One verification step of one sequence (what the rollout turns into an experience block)."""

    prefix_len: int  # committed tokens before the block (the anchor a; drafts predict positions a..a+K-1)
    draft_tokens: np.ndarray  # [K] int
    draft_q: np.ndarray  # [K] processed q(d_i) (1.0 when greedy)
    draft_logprobs: np.ndarray  # [K] raw log q(d_i)
    target_topk_ids: np.ndarray  # [K, k] int
    target_topk_probs: np.ndarray  # [K, k] raw (T=1) target probabilities
    target_tail: np.ndarray  # [K] 1 - sum(top-k)
    target_draft_prob: np.ndarray  # [K] raw p(d_i)
    accept_mask: np.ndarray  # [K] bool
    committed: list[int]  # tokens this step committed (accepted drafts + correction/bonus, after truncation)


@dataclass
class SeqResult:
    index: int
    prompt_ids: list[int]
    output_ids: list[int]
    accepted: list[int] = field(default_factory=list)  # accepted drafts per verification step
    steps: list[StepRecord] = field(default_factory=list)
    features: torch.Tensor | None = None  # [len(prompt)+len(output)-1, F] target features
    topk_ids: np.ndarray | None = None  # [len(output), k] rows plen-1.. (keep_topk): the target's top-k for token t+1
    topk_probs: np.ndarray | None = None  # [len(output), k]
    hidden: torch.Tensor | None = None  # [len(output), H] rows plen-1.. (keep_hidden): the final normed hidden state
    finish: str = "length"


@dataclass
class EngineStats:
    num_steps: int = 0
    accepted_hist: list[int] = field(default_factory=list)  # count of steps with exactly i accepted, i = 0..K
    new_tokens: int = 0
    wall_s: float = 0.0
    prefill_s: float = 0.0
    target_s: float = 0.0
    draft_s: float = 0.0

    @property
    def tau(self) -> float:
        total = sum((i + 1) * c for i, c in enumerate(self.accepted_hist))
        return total / max(self.num_steps, 1)

    @property
    def alpha(self) -> list[float]:
        h = self.accepted_hist
        K = len(h) - 1
        out = []
        for i in range(1, K + 1):
            reached = sum(h[i - 1 :])
            out.append(sum(h[i:]) / reached if reached else 0.0)
        return out

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0


def tau_alpha(accepted: list[int], K: int) -> tuple[float, list[float]]:
    s = EngineStats(
        num_steps=len(accepted), accepted_hist=list(np.bincount(np.asarray(accepted, dtype=int), minlength=K + 1))
    )
    return s.tau, s.alpha


class SpecEngine:
    """Speculative decoding of many prompts with one target and (optionally) one drafter."""

    def __init__(self, target: Target, drafter: Drafter | None = None):
        self.target = target
        self.drafter = drafter
        if drafter is not None:
            target.info.check_compatible(drafter.target_info, "the drafter")
            drafter.bind_target(target.model)  # a self-speculative drafter (DVI) drafts with this target's layers
            self.drafter = drafter.for_inference(target.dtype)
        cfg = target.model.config
        self.num_layers = cfg.num_hidden_layers
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eos = torch.tensor(target.eos_token_ids or [-1], device=target.device)
        self.weights_version = 0  # bumped by set_drafter_weights; batches rebuild their drafter context on a change

    def check_prompts(self, prompts: list[list[int]], settings: DecodeSettings) -> None:
        if not prompts:
            raise PromptError("no prompts to decode (the prompt set is empty)")
        limit = self.target.info.max_positions
        for i, p in enumerate(prompts):
            if len(p) < 2:
                raise PromptError(f"prompt {i} has {len(p)} token(s); at least 2 are needed (use the chat template)")
            need = len(p) + settings.max_new_tokens + settings.block_size + 1
            if need > limit:
                raise PromptError(
                    f"prompt {i} is too long: {len(p)} prompt tokens + {settings.max_new_tokens} new tokens + "
                    f"{settings.block_size + 1} verification slots = {need} > the target's context of {limit}"
                )

    def set_drafter_weights(self, state_dict: dict) -> None:
        """Swap the drafter's weights (a learner's newer policy); call between steps, never during one.

        Losslessness does not depend on the drafter: verification by the target decides every committed token. Every
        open `DecodeBatch` rebuilds its drafter context from the target features at its next step, so no row drafts
        from K/V that the old weights computed."""
        if self.drafter is None:
            raise PromptError("this engine has no drafter (plain target decoding): there are no weights to swap")
        dt = self.drafter._dtype()
        self.drafter.load_state_dict({k: v.to(dt) if v.is_floating_point() else v for k, v in state_dict.items()})
        self.weights_version += 1

    def batch(self, settings: DecodeSettings, capacity: int, max_len: int) -> DecodeBatch:
        """An empty continuous batch of `capacity` slots, each holding up to `max_len` positions."""
        return DecodeBatch(self, settings, capacity, max_len)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        settings: DecodeSettings,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[list[SeqResult], EngineStats]:
        """Decode every prompt; `progress(finished_sequences, committed_tokens)` is called after each step.

        A thin driver of `DecodeBatch`: fill the slots, step, refill the slots that finished (the server drives the
        same batch with requests that arrive while it runs)."""
        self.check_prompts(prompts, settings)
        K = settings.block_size if self.drafter is not None else 0
        S = max(len(p) for p in prompts) + settings.max_new_tokens + 2 * (K + 1) + 2
        batch = DecodeBatch(self, settings, min(settings.batch_size, len(prompts)), S)
        queue = deque(range(len(prompts)))
        results: dict[int, SeqResult] = {}
        t_start = time.perf_counter()
        while queue and batch.free:
            i = queue.popleft()
            batch.join(prompts[i], key=i)
        while batch.num_rows:
            events = batch.step()
            done = [e.result for e in events if e.result is not None]
            for r in done:
                results[r.index] = r
            if progress is not None:
                progress(len(done), sum(len(e.new_tokens) for e in events))
            for _ in done:
                if queue:
                    i = queue.popleft()
                    batch.join(prompts[i], key=i)
        batch.stats.wall_s = time.perf_counter() - t_start
        return [results[i] for i in range(len(prompts))], batch.stats


@dataclass
class RowEvent:
    """What one step did to one row: the tokens it committed, and the finished result when the row left the batch."""

    key: object
    new_tokens: list[int]
    accepted: int  # drafts accepted this step (0..K)
    result: SeqResult | None = None


class DecodeBatch:
    """Slots decoding together, one verification step at a time; a request joins a free slot and leaves when it
    finishes (EOS, its own max_new_tokens) or is cancelled (a stop string, a client gone), between steps.

    One decode loop serves `SpecEngine.generate` and the server alike. Sampling settings (K, temperature, top_p,
    acceptance rule) are the batch's; the token budget is per row. Joined rows are prefilled together at the start of
    the next `step`, as the offline loop refilled freed slots in one forward."""

    def __init__(self, engine: SpecEngine, settings: DecodeSettings, capacity: int, max_len: int):
        self.engine = engine
        self.settings = settings
        K = settings.block_size if engine.drafter is not None else 0
        if engine.drafter is not None and K < 1:
            raise PromptError(f"block size K must be >= 1 (got {settings.block_size})")
        if (settings.keep_topk or settings.keep_hidden) and K > 0:
            raise PromptError(
                "keep_topk and keep_hidden are for plain decoding (block_size 0): speculative steps record their own top-k"
            )
        if settings.acceptance not in ("rejection", "match"):
            raise PromptError(f"unknown acceptance rule '{settings.acceptance}' (rejection | match)")
        target = engine.target
        self.K = K
        self.B = B = capacity
        self.S = S = max_len
        dev = self.dev = target.device
        self.need_feat = engine.drafter is not None or settings.keep_features
        layers = engine.drafter.feature_layers if engine.drafter is not None else settings.feature_layers
        if settings.keep_features and not layers:
            raise PromptError("keep_features needs feature layers (a drafter's, or settings.feature_layers)")
        self.layers = layers if self.need_feat else None
        F = len(self.layers) * target.info.hidden_size if self.layers else 0
        self.gen = torch.Generator(device=dev).manual_seed(settings.seed)
        self.cache = SlotCache(engine.num_layers, B, engine.kv_heads, engine.head_dim, S, dev, target.dtype)
        d = engine.drafter
        self.dstate = d.new_state(B, S, dev, d._dtype()) if d is not None else None
        self.tokens = torch.zeros(B, S, dtype=torch.long, device=dev)
        self.feats = torch.zeros(B, S, F, device=dev, dtype=target.dtype) if self.need_feat else None
        self.kt = kt = min(settings.topk, target.info.vocab_size)
        self.top_ids = torch.zeros(B, S, kt, dtype=torch.int32, device=dev) if settings.keep_topk else None
        self.top_p = torch.zeros(B, S, kt, dtype=torch.float32, device=dev) if settings.keep_topk else None
        self.hid = (
            torch.zeros(B, S, target.info.hidden_size, dtype=target.dtype, device=dev) if settings.keep_hidden else None
        )
        self.n = torch.zeros(B, dtype=torch.long, device=dev)
        self.plen_t = torch.zeros(B, dtype=torch.long, device=dev)
        self.max_new_t = torch.zeros(B, dtype=torch.long, device=dev)
        self.plen = [0] * B
        self.keys: list[object] = [None] * B
        self.active = torch.zeros(B, dtype=torch.bool, device=dev)
        self.results: dict[int, SeqResult] = {}  # slot -> the row's result so far
        self.pending: list[int] = []  # joined slots waiting for their prefill
        self.stats = EngineStats(accepted_hist=[0] * (K + 1))
        self.weights_seen = engine.weights_version

    @property
    def free(self) -> int:
        return self.B - len(self.results)

    @property
    def num_rows(self) -> int:
        return len(self.results)

    def fits(self, prompt_len: int, max_new_tokens: int) -> bool:
        return prompt_len + max_new_tokens + 2 * (self.K + 1) + 2 <= self.S

    def join(self, prompt_ids: list[int], key: object = None, max_new_tokens: int | None = None) -> int:
        """Put a prompt into a free slot (decoded from the next step on); returns the slot."""
        max_new = self.settings.max_new_tokens if max_new_tokens is None else max_new_tokens
        self.engine.check_prompts([prompt_ids], replace(self.settings, max_new_tokens=max_new))
        if not self.fits(len(prompt_ids), max_new):
            raise PromptError(
                f"prompt of {len(prompt_ids)} tokens + {max_new} new tokens does not fit this batch's {self.S} positions"
            )
        free = [b for b in range(self.B) if b not in self.results]
        if not free:
            raise PromptError(f"the batch is full ({self.B} rows)")
        b = free[0]
        index = key if isinstance(key, int) else b
        self.results[b] = SeqResult(index=index, prompt_ids=list(prompt_ids), output_ids=[])
        self.keys[b] = key
        self.plen[b] = len(prompt_ids)
        self.plen_t[b] = len(prompt_ids)
        self.max_new_t[b] = max_new
        self.tokens[b, : len(prompt_ids)] = torch.tensor(prompt_ids, device=self.dev)
        self.n[b] = len(prompt_ids)
        self.pending.append(b)
        return b

    def cancel(self, key: object) -> SeqResult | None:
        """Take a row out of the batch now (between steps); returns what it had committed, or None if not here."""
        for b, k in enumerate(self.keys):
            if b in self.results and k == key:
                res = self.results.pop(b)
                res.finish = "cancelled"
                self.active[b] = False
                self.keys[b] = None
                if b in self.pending:
                    self.pending.remove(b)
                return res
        return None

    def _sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def _prefill(self, take: list[int]) -> None:
        t0 = time.perf_counter()
        rows = torch.tensor(take, device=self.dev)
        T = max(self.plen[b] for b in take) - 1
        pos = torch.arange(T, device=self.dev).expand(len(take), T)
        out = self.engine.target.forward(
            self.tokens[rows, :T],
            pos,
            self.cache,
            None if len(take) == self.B else rows,
            T,
            self.layers,
            want_logits=False,
            causal=True,
        )
        if self.need_feat:
            self.feats[rows, :T] = out.features.to(self.feats.dtype)
        if self.dstate is not None:
            self.dstate.reset(rows, self.engine.drafter.context_start())
        self.active[rows] = True
        self._sync()
        self.stats.prefill_s += time.perf_counter() - t0

    @torch.no_grad()
    def step(self) -> list[RowEvent]:
        """Prefill the rows that joined, then one draft + verify + commit step for every row; finished rows leave."""
        settings, K, S, dev = self.settings, self.K, self.S, self.dev
        tokens, feats, n, stats = self.tokens, self.feats, self.n, self.stats
        if self.dstate is not None and self.weights_seen != self.engine.weights_version:
            # new drafter weights: the drafter's context K/V of running rows is rebuilt from the target features
            running = self.active.nonzero().squeeze(1)
            if len(running):
                self.dstate.reset(running, self.engine.drafter.context_start())
            self.weights_seen = self.engine.weights_version
        if self.pending:
            take, self.pending = self.pending, []
            self._prefill(take)
        if not bool(self.active.any()):
            return []
        act = self.active.nonzero().squeeze(1)
        rows = None if len(act) == self.B else act
        sel = (lambda t: t) if rows is None else (lambda t, rows=rows: t[rows])
        nb = sel(n).clone()
        t0 = time.perf_counter()
        prop = None
        if K > 0:
            draft_t = 0.0 if settings.acceptance == "match" else settings.temperature
            prop = self.engine.drafter.propose(
                self.dstate, rows, tokens, feats, n, K, draft_t, settings.top_p, self.gen
            )
            self._sync()
        t1 = time.perf_counter()
        last = sel(tokens).gather(1, (nb - 1)[:, None])
        inp = torch.cat([last, prop.tokens], dim=1) if K > 0 else last
        pos = (nb - 1)[:, None] + torch.arange(K + 1, device=dev)[None]
        kv_len = int(pos.max()) + 1
        out = self.engine.target.forward(inp, pos, self.cache, rows, kv_len, self.layers)
        logits = out.logits.float()  # [b, K+1, V]
        if self.need_feat:
            feats[act[:, None], pos] = out.features.to(feats.dtype)
        if self.top_ids is not None:  # K = 0: the one fed position n-1 predicts token n
            tk = torch.log_softmax(logits[:, 0], dim=-1).topk(self.kt, dim=-1)
            self.top_ids[act, pos[:, 0]] = tk.indices.to(torch.int32)
            self.top_p[act, pos[:, 0]] = tk.values.exp()
        if self.hid is not None:
            self.hid[act, pos[:, 0]] = out.last_hidden[:, 0].to(self.hid.dtype)
        greedy = settings.temperature <= 0
        p = logits if greedy else processed_probs(logits, settings.temperature, settings.top_p)
        verdict = verify(
            prop.tokens if K > 0 else inp[:, :0], p, prop.q if K > 0 else None, greedy, self.gen, settings.acceptance
        )
        self._sync()
        t2 = time.perf_counter()
        stats.draft_s += t1 - t0
        stats.target_s += t2 - t1

        # commit: candidate tokens [d_1..d_n, next]; truncate at EOS and at the row's max_new_tokens
        cand = torch.cat([prop.tokens, torch.zeros_like(last)], 1) if K > 0 else torch.zeros_like(last)
        cand.scatter_(1, verdict.num_accepted[:, None], verdict.next_token[:, None])
        count = verdict.num_accepted + 1
        room = self.max_new_t[act] - (nb - self.plen_t[act])
        idx = torch.arange(K + 1, device=dev)[None]
        is_eos = torch.isin(cand, self.engine.eos) & (idx < count[:, None]) & settings.stop_at_eos
        first_eos = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, count)
        keep = torch.minimum(torch.minimum(count, first_eos), room)
        eos_hit = is_eos.any(1) & (first_eos <= keep)
        done = (keep >= room) | eos_hit
        tokens[act[:, None], (nb[:, None] + idx).clamp(max=S - 1)] = cand
        n[act] = nb + keep

        rec = None
        if settings.record and K > 0:
            lsm = torch.log_softmax(logits[:, :K], dim=-1)
            tk = lsm.topk(min(settings.topk, lsm.shape[-1]), dim=-1)
            tk_p = tk.values.exp()
            rec = dict(
                draft=prop.tokens.cpu().numpy(),
                q=prop.q_token.float().cpu().numpy(),
                lq=prop.logprob.float().cpu().numpy(),
                ids=tk.indices.cpu().numpy().astype(np.int32),
                probs=tk_p.cpu().numpy(),
                tail=(1 - tk_p.sum(-1)).clamp_min(0).cpu().numpy(),
                pd=lsm.gather(-1, prop.tokens[..., None]).squeeze(-1).exp().cpu().numpy(),
                acc=verdict.accept_mask.cpu().numpy(),
            )
        acc_list = verdict.num_accepted.tolist()
        keep_list = keep.tolist()
        cand_list = cand.tolist()
        nb_list = nb.tolist()
        done_list = done.tolist()
        eos_list = eos_hit.tolist()
        events = []
        for j, slot in enumerate(act.tolist()):
            res = self.results[slot]
            res.accepted.append(acc_list[j])
            stats.accepted_hist[acc_list[j]] += 1
            stats.num_steps += 1
            committed = cand_list[j][: keep_list[j]]
            res.output_ids.extend(committed)
            stats.new_tokens += len(committed)
            if rec is not None:
                res.steps.append(
                    StepRecord(
                        prefix_len=nb_list[j],
                        draft_tokens=rec["draft"][j],
                        draft_q=rec["q"][j],
                        draft_logprobs=rec["lq"][j],
                        target_topk_ids=rec["ids"][j],
                        target_topk_probs=rec["probs"][j],
                        target_tail=rec["tail"][j],
                        target_draft_prob=rec["pd"][j],
                        accept_mask=rec["acc"][j],
                        committed=committed,
                    )
                )
            ev = RowEvent(key=self.keys[slot], new_tokens=committed, accepted=acc_list[j])
            if done_list[j]:
                res.finish = "eos" if eos_list[j] else "length"
                self._finish_row(slot, res)
                ev.result = res
            events.append(ev)
        return events

    def _finish_row(self, slot: int, res: SeqResult) -> None:
        plen = self.plen[slot]
        if self.top_ids is not None:
            rows_ = slice(plen - 1, plen - 1 + len(res.output_ids))
            # copies: the slot's buffers are overwritten by the next prompt that joins it
            res.topk_ids = self.top_ids[slot, rows_].cpu().numpy().copy()
            res.topk_probs = self.top_p[slot, rows_].cpu().numpy().copy()
        if self.hid is not None:
            res.hidden = self.hid[slot, plen - 1 : plen - 1 + len(res.output_ids)].cpu().clone()
        if self.settings.keep_features:
            total = plen + len(res.output_ids)
            res.features = self.feats[slot, : total - 1].cpu().clone()
        self.active[slot] = False
        self.keys[slot] = None
        del self.results[slot]
