"""The target scores many short branches off one sequence in ONE forward (a tree attention mask).

A branch (s, t_0..t_{m-1}) is a hypothetical continuation: token t_i sits at position s+i and sees the sequence's
tokens before s and its own branch's earlier tokens, nothing else. Laid out as [sequence | branch 1 | branch 2 ..]
with that mask, one forward gives the target's state after every branch token, plus the ordinary
causal states along the sequence itself, at the cost of one prefill of the sequence plus the branch tokens, instead
of one decoding pass per branch.

Used for the drafted tokens after a first rejection (re-segmented rollouts) and for error-position replay blocks.
"""

from __future__ import annotations

import torch

from dopd.common.models import Target


@torch.no_grad()
def score_branches(
    target: Target, tokens: list[list[int]], branches: list[list[tuple[int, list[int]]]]
) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Per row: (sequence hidden states [n, H], one [m, H] tensor per branch (after each branch token)).

    tokens[i] is row i's sequence; branches[i] its branches (start position s <= n, tokens). The caller applies
    `target.lm_head` to the rows it needs (a full-vocabulary row costs far more memory than a hidden state).
    """
    dev = target.device
    lens = [len(t) for t in tokens]
    L = [n + sum(len(b) for _, b in br) for n, br in zip(lens, branches)]
    Lmax = max(L)
    B = len(tokens)
    inp = torch.zeros(B, Lmax, dtype=torch.long, device=dev)
    pos = torch.zeros(B, Lmax, dtype=torch.long, device=dev)
    mask = torch.zeros(B, Lmax, Lmax, dtype=torch.bool, device=dev)
    for i in range(B):
        n = lens[i]
        inp[i, :n] = torch.tensor(tokens[i], device=dev)
        pos[i, :n] = torch.arange(n, device=dev)
        mask[i, :n, :n] = torch.tril(torch.ones(n, n, dtype=torch.bool, device=dev))
        r = n
        for s, b in branches[i]:
            m = len(b)
            if not m:
                continue
            if not 1 <= s <= n:
                raise ValueError(f"branch start {s} outside 1..{n}")
            inp[i, r : r + m] = torch.tensor(b, device=dev)
            pos[i, r : r + m] = s + torch.arange(m, device=dev)
            mask[i, r : r + m, :s] = True
            mask[i, r : r + m, r : r + m] = torch.tril(torch.ones(m, m, dtype=torch.bool, device=dev))
            r += m
        if L[i] < Lmax:  # padding rows see themselves only (no NaN rows)
            mask[i, L[i] :, L[i] :] = torch.eye(Lmax - L[i], dtype=torch.bool, device=dev)
    hidden = target.model.model(
        input_ids=inp, attention_mask=mask[:, None], position_ids=pos, use_cache=False
    ).last_hidden_state
    seq_h, br_h = [], []
    for i in range(B):
        n = lens[i]
        seq_h.append(hidden[i, :n])
        out, r = [], n
        for _, b in branches[i]:
            out.append(hidden[i, r : r + len(b)])
            r += len(b)
        br_h.append(out)
    return seq_h, br_h
