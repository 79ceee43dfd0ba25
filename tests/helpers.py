"""Test doubles. `OracleDrafter` drafts with the target itself (plus noise), so acceptance is high and every
verification path (partial accept, full accept + bonus, reject) is exercised without training."""

from __future__ import annotations

import torch

from dopd.common.drafters.base import Drafter, DrafterSpec, DraftState, Proposal
from dopd.common.sampling import processed_probs


class _TargetDouble(Drafter):
    """What both oracle doubles share: a spec of the target's shapes (one feature layer), the target itself, a dummy
    parameter in the target's dtype (drafts in that dtype: no inference copy), no drafter cache, no training forward."""

    def __init__(self, target, feature_layer: int):
        info = target.info
        spec = DrafterSpec(
            kind=self.kind, hidden_size=info.hidden_size, intermediate_size=1, num_layers=1, num_heads=1,
            num_kv_heads=1, head_dim=info.hidden_size, feature_layers=[feature_layer],
            target_hidden_size=info.hidden_size, vocab_size=info.vocab_size, target=info.to_dict(),
        )  # fmt: skip
        super().__init__(spec, target.embed_tokens.weight, target.lm_head.weight)
        self.dummy = torch.nn.Parameter(torch.zeros(1, dtype=target.dtype))
        self.target = target
        self._greedy: dict[tuple[int, ...], int] = {}  # prefix -> the target's greedy next token

    @torch.no_grad()
    def _walk(self, prefix: list[int], K: int, choose) -> list[int]:
        """K tokens after `prefix`, the j-th `choose(j, position, greedy)` where `greedy` is the target's greedy next
        token after everything so far. One prefix always gets one answer (memoised, whichever call asked first), so
        drafting from any anchor agrees with drafting along the way; a miss costs one forward of the tokens not yet
        in this chain's KV cache (the prefix once, then one token per draft), not a forward of the whole prefix."""
        seq, out, past, fed = list(prefix), [], None, 0  # past: this chain's HF cache
        for j in range(K):
            greedy = self._greedy.get(key := tuple(seq))
            if greedy is None:
                ids = torch.tensor([seq[fed:]], device=self.target.device)
                o = self.target.model(input_ids=ids, cache=past, use_cache=True)
                past, fed = o.cache, len(seq)
                greedy = self._greedy[key] = int(o.logits[0, -1].float().argmax())
            seq.append(t := int(choose(j, len(seq), greedy)))
            out.append(t)
        return out

    def context_start(self) -> int:
        return 0

    def new_state(self, batch, max_len, device, dtype) -> DraftState:
        return DraftState([], [], torch.zeros(batch, dtype=torch.long))

    def block_hidden(self, *a, **k):
        raise NotImplementedError("test double: inference only")


class OracleDrafter(_TargetDouble):
    kind = "oracle"

    def __init__(self, target, noise: float = 0.3, q_temperature: float = 1.5, seed: int = 0):
        super().__init__(target, target.info.num_layers - 1)
        self.noise = noise
        self.q_temperature = q_temperature
        self.gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def propose(
        self, state, rows, tokens, features, lengths, K, temperature=0.0, top_p=1.0, generator=None
    ) -> Proposal:
        sel = (lambda t: t) if rows is None else (lambda t: t[rows])
        tok, n = sel(tokens).clone(), sel(lengths).clone()
        b = tok.shape[0]
        ar = torch.arange(b)
        if temperature <= 0:  # the target's greedy chain with random flips (the same draws, in the same order)
            V = self.spec.vocab_size
            draws = [(torch.rand(b, generator=self.gen) < self.noise, torch.randint(0, V, (b,), generator=self.gen)) for _ in range(K)]  # fmt: skip
            ids = [
                self._walk(
                    tok[i, : int(n[i])].tolist(), K, lambda j, _, g, i=i: draws[j][1][i] if draws[j][0][i] else g
                )
                for i in range(b)
            ]
            return Proposal(torch.tensor(ids, device=tokens.device), None, torch.ones(b, K), torch.zeros(b, K))
        toks, qs, qtok = [], [], []
        for _ in range(K):  # one batched forward per draft position (right-padded rows, logits at each row's end)
            S = int(n.max())
            am = (torch.arange(S)[None, :] < n[:, None]).long()
            logits = self.target.model(tok[:, :S], attention_mask=am).logits[ar, n - 1].float()
            # a deliberately different distribution q (flatter), sampled
            q = processed_probs(logits, temperature * self.q_temperature, top_p)
            t = torch.multinomial(q, 1, generator=generator).squeeze(-1)
            qs.append(q)
            qtok.append(q[ar, t])
            toks.append(t)
            tok[ar, n] = t
            n = n + 1
        return Proposal(torch.stack(toks, 1), torch.stack(qs, 1), torch.stack(qtok, 1), torch.zeros(b, K))

    def draft_blocks(self, *a, **k):
        raise NotImplementedError("test double: inference only")


class HashOracleDrafter(_TargetDouble):
    """Drafts the target's greedy token, except at positions p with p % period == 0, where it drafts the next id.

    Deterministic in (prefix, position), so its inference forward (`propose`) and its block forward at any anchor
    (`draft_blocks`) agree exactly, as a real drafter's do: acceptance is partial and known, on any target.
    """

    kind = "hash-oracle"

    def __init__(self, target, period: int = 3):
        super().__init__(target, target.info.num_layers)
        self.period = period

    def _chains(self, prefixes: list[list[int]], K: int) -> torch.Tensor:
        V, period = self.spec.vocab_size, self.period
        flip = lambda j, pos, g: (g + 1) % V if pos % period == 0 else g  # noqa: E731 - pos: the position predicted
        return torch.tensor([self._walk(p, K, flip) for p in prefixes], dtype=torch.long).view(len(prefixes), K)

    def propose(
        self, state, rows, tokens, features, lengths, K, temperature=0.0, top_p=1.0, generator=None
    ) -> Proposal:
        sel = (lambda t: t) if rows is None else (lambda t: t[rows])
        tok, n = sel(tokens), sel(lengths)
        ids = self._chains([tok[i, : int(n[i])].tolist() for i in range(tok.shape[0])], K).to(tokens.device)
        b = ids.shape[0]
        return Proposal(ids, None, torch.ones(b, K), torch.zeros(b, K))

    def draft_blocks(self, tokens, features, lengths, anchors, K, temperature=0.0, generator=None):
        B, M = anchors.shape
        prefixes = [tokens[b, : max(int(anchors[b, m]), 1)].tolist() for b in range(B) for m in range(M)]
        ids = self._chains(prefixes, K).view(B, M, K).to(tokens.device)
        return ids, torch.zeros(B, M, K), torch.ones(B, M, K)


def hash_oracle_accepted(prompt_len: int, num_new: int, K: int, period: int) -> list[int]:
    """The accepted drafts per verification step of greedy speculative decoding with `HashOracleDrafter(period)`,
    counted from first principles (no engine, no drafter): a step at position `pos` accepts drafts up to the first
    position p = pos + j with p % period == 0 (a wrong draft), then commits that many plus the target's token."""
    pos, left, out = prompt_len, num_new, []
    while left > 0:
        a = next((j for j in range(K) if (pos + j) % period == 0), K)
        out.append(a)
        pos, left = pos + a + 1, left - (a + 1)
    return out


def tau_alpha_of(accepted: list[int], K: int) -> tuple[float, list[float]]:
    """tau (tokens per step) and alpha (per-position acceptance given the position was reached) of accepted counts."""
    tau = sum(a + 1 for a in accepted) / len(accepted)
    alpha = [
        sum(a > i for a in accepted) / reached if (reached := sum(a >= i for a in accepted)) else 0.0 for i in range(K)
    ]
    return tau, alpha


def assert_counts_agree(rep: dict, outputs: list[dict], K: int) -> None:
    """A report's tau against the tokens actually written (`--dump-outputs`, counted independently of the engine's
    statistics): new_tokens is the sum of the output lengths, and the steps committed tau x steps tokens, of which
    each prompt's last step may have cut at most K at max_new_tokens / end of turn."""
    written = sum(len(o["output_ids"]) for o in outputs)
    assert rep["new_tokens"] == written, (rep["new_tokens"], written)
    committed = rep["tau"] * rep["num_steps"]
    assert committed - K * len(outputs) - 1e-6 <= written <= committed + 1e-6, (committed, written, K)
    assert 1.0 <= rep["tau"] <= K + 1 and len(rep["alpha"]) == K


def heldout_of_saved(cfg, out_dir) -> dict:
    """The held-out measurement of the drafter a run saved (out_dir/drafter), recomputed in this process with a fresh
    target and the drafter loaded from disk, on the run's own held-out prompts and settings: what a run's summary tau
    must equal."""
    from pathlib import Path

    from dopd.common.drafters import load_drafter
    from dopd.common.evaluation import eval_settings, heldout
    from dopd.common.models import load_target
    from dopd.prompts import run_prompts

    tgt = load_target(cfg.model.target, cfg.model.device, cfg.model.dtype, forward=cfg.model.forward)
    d = load_drafter(Path(out_dir) / "drafter", tgt.info, tgt.embed_tokens.weight, tgt.lm_head.weight)
    ids = run_prompts(cfg, tgt.tokenizer).eval_ids[: cfg.eval.num_prompts]
    return heldout(tgt, d, ids, eval_settings(cfg), simulate=cfg.eval.simulate)


class FixedLogits(torch.nn.Module):
    """A stand-in drafter whose block forward is given logits [B,M,K,Vd]: an objective's loss on exactly these q."""

    def __init__(self, logits: torch.Tensor, t2d: torch.Tensor):
        super().__init__()
        self.q, self.t2d = logits, t2d

    def block_hidden(self, *inputs):
        return self.q

    def logits(self, h):
        return h


def objective_loss(
    name, loss_cfg, targets, logits, t2d, step=0, denom=None, step_weight=None, response_tokens=0, **cfg
):
    """(LossParts, Mask) of the objective production trains (`learner/objectives`, `objective_for`), through its
    public API (mask, then loss under that mask), on a batch of hand-built verification blocks and given logits.
    name: an objective name or "sft" (the warm-up); cfg: other Config sections (e.g. dvi=DVIConfig(...))."""
    import dataclasses

    from dopd.common.config import Config, MetricsConfig
    from dopd.learner.batch import TrainBatch
    from dopd.learner.objectives import objective_for

    c = Config(loss=dataclasses.replace(loss_cfg), metrics=MetricsConfig(replay_kl=False), **cfg)
    if name != "sft":
        c.loss.objective = name
    obj = objective_for(c, "sft" if name == "sft" else "opd")
    z = torch.zeros(1)
    batch = TrainBatch(z, z, z, z, z, targets, step_weight=step_weight, response_tokens=response_tokens)
    drafter = FixedLogits(logits, t2d)
    mask = obj.mask(batch, t2d)
    return obj.loss(drafter, batch, mask, step, denom), mask


def random_drafter(tiny, kind="eagle3", layers=1, reduced=False, seed=0, spec=None, **cfg):
    """A drafter of `kind` with every weight perturbed (norms included, so a swapped or missing norm shows), a RoPE
    base other than the target's (so a lost rope_theta shows) and, when reduced, an UNSORTED draft vocabulary; the
    export and interop tests (test_export, test_peagle) compare its logits with an independent implementation's.
    spec: DrafterSpec fields set after `spec_for` (e.g. P-EAGLE's mask_token_id); cfg: DrafterConfig fields. DFlash's
    MASK (`mask_embedding`) stays the embedding row of mask_token_id (z-lab's rule)."""
    from dataclasses import replace

    from dopd.common.config import DrafterConfig
    from dopd.common.drafters import KINDS, spec_for

    g = torch.Generator().manual_seed(seed)
    dcfg = DrafterConfig(kind=kind, num_layers=layers, draft_vocab_size=100 if reduced else None, **cfg)
    s = replace(spec_for(dcfg, tiny.info, tiny.model.config), rope_theta=5e4, **(spec or {}))
    ids = torch.randperm(tiny.info.vocab_size, generator=g)[:100] if reduced else None
    d = KINDS[kind](s, tiny.embed_tokens.weight, tiny.lm_head.weight, ids)
    with torch.no_grad():
        for n, p in d.named_parameters():
            if "mask_embedding" not in n:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return d.eval()


def target_states(tiny, S: int):
    """One random sequence of S tokens (seed 1) and the target's hidden states for it."""
    tok = torch.randint(0, tiny.info.vocab_size, (1, S), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hs = tiny.model(tok, output_hidden_states=True).hidden_states
    return tok, hs


def features(d, hs):
    """The drafter's input features: its feature layers' hidden states, concatenated."""
    return torch.cat([hs[i] for i in d.feature_layers], -1)
