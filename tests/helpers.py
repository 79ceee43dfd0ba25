"""Test doubles. `OracleDrafter` drafts with the target itself (plus noise), so acceptance is high and every
verification path (partial accept, full accept + bonus, reject) is exercised without training."""

from __future__ import annotations

import torch

from dopd.common.drafters.base import Drafter, DraftState, DrafterSpec, Proposal
from dopd.common.sampling import processed_probs


class OracleDrafter(Drafter):
    kind = "oracle"

    def __init__(self, target, noise: float = 0.3, q_temperature: float = 1.5, seed: int = 0):
        info = target.info
        spec = DrafterSpec(kind="oracle", hidden_size=info.hidden_size, intermediate_size=1, num_layers=1, num_heads=1,
                           num_kv_heads=1, head_dim=info.hidden_size, feature_layers=[info.num_layers - 1],
                           target_hidden_size=info.hidden_size, vocab_size=info.vocab_size, target=info.to_dict())
        super().__init__(spec, target.embed_tokens.weight, target.lm_head.weight)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.target = target
        self.noise = noise
        self.q_temperature = q_temperature
        self.gen = torch.Generator().manual_seed(seed)

    def context_start(self) -> int:
        return 0

    def new_state(self, batch, max_len, device, dtype) -> DraftState:
        return DraftState([], [], torch.zeros(batch, dtype=torch.long))

    @torch.no_grad()
    def propose(self, state, rows, tokens, features, lengths, K, temperature=0.0, top_p=1.0, generator=None) -> Proposal:
        sel = (lambda t: t) if rows is None else (lambda t: t[rows])
        tok, n = sel(tokens).clone(), sel(lengths).clone()
        b = tok.shape[0]
        ar = torch.arange(b)
        toks, qs, qtok = [], [], []
        for _ in range(K):  # one batched forward per draft position (right-padded rows, logits at each row's end)
            S = int(n.max())
            am = (torch.arange(S)[None, :] < n[:, None]).long()
            logits = self.target.model(tok[:, :S], attention_mask=am).logits[ar, n - 1].float()
            if temperature <= 0:
                t = logits.argmax(-1)
                flip = torch.rand(b, generator=self.gen) < self.noise
                t = torch.where(flip, torch.randint(0, logits.shape[-1], (b,), generator=self.gen), t)
                qtok.append(torch.ones(b))
            else:  # a deliberately different distribution q (flatter), sampled
                q = processed_probs(logits, temperature * self.q_temperature, top_p)
                t = torch.multinomial(q, 1, generator=generator).squeeze(-1)
                qs.append(q)
                qtok.append(q[ar, t])
            toks.append(t)
            tok[ar, n] = t
            n = n + 1
        q = torch.stack(qs, 1) if temperature > 0 else None
        return Proposal(torch.stack(toks, 1), q, torch.stack(qtok, 1), torch.zeros(b, K))

    def block_hidden(self, *a, **k):
        raise NotImplementedError("test double: inference only")

    def draft_blocks(self, *a, **k):
        raise NotImplementedError("test double: inference only")
