"""Losses on hand-built blocks equal hand-computed values (both streams, decay, tail bucket, normalisation, the
official recipe's offsets, clamp and log-prob floor, stream flags)."""

from __future__ import annotations

import math

import pytest
import torch

from dopd.common.config import LossConfig
from dopd.learner.losses import (
    BlockTargets,
    block_weight,
    bucket_divergence,
    opd_loss,
    rejection_weights,
    sft_loss,
    sft_valid,
    token_divergence,
)

V = 6


def LC(**kw) -> LossConfig:
    """A resolved loss config (every recipe field set): top-k fKL accepted stream, no clamp, offsets from the
    first rejection, unless overridden."""
    base = dict(response="blocks", acc_divergence="fkl", lambda_rej=1.0, clamp=None, gamma_offset="rejection")
    return LossConfig(**{**base, **kw})


def targets(accept, topk_ids, topk_probs, tail, draft, p_draft):
    acc = torch.tensor(accept)[None, None]
    K = acc.shape[-1]
    return BlockTargets(
        topk_ids=torch.tensor(topk_ids)[None, None], topk_probs=torch.tensor(topk_probs)[None, None],
        tail=torch.tensor(tail)[None, None], draft_tokens=torch.tensor(draft)[None, None],
        p_draft=torch.tensor(p_draft)[None, None], accept=acc, valid=torch.ones(1, 1, K, dtype=torch.bool),
    )  # fmt: skip


def logq_of(q_rows):
    return torch.log(torch.tensor(q_rows, dtype=torch.float32))[None, None]


T2D = torch.arange(V)
Q = [[0.5, 0.2, 0.1, 0.1, 0.05, 0.05], [0.1, 0.6, 0.1, 0.1, 0.05, 0.05], [0.25, 0.25, 0.2, 0.1, 0.1, 0.1]]
TOPK_IDS = [[0, 2], [1, 0], [3, 4]]
TOPK_P = [[0.6, 0.3], [0.7, 0.2], [0.5, 0.1]]
TAIL = [0.1, 0.1, 0.4]
DRAFT = [0, 1, 2]
PD = [0.6, 0.7, 0.05]


def fkl_hand(j):
    q = Q[j]
    ids, ps = TOPK_IDS[j], TOPK_P[j]
    total = sum(p * math.log(p / q[i]) for i, p in zip(ids, ps))
    q_tail = 1 - sum(q[i] for i in ids)
    return total + TAIL[j] * math.log(TAIL[j] / q_tail)


def test_forward_kl_with_tail_bucket():
    T = targets([True, True, False], TOPK_IDS, TOPK_P, TAIL, DRAFT, PD)
    got = bucket_divergence("fkl", logq_of(Q), T2D, T)[0, 0]
    for j in range(3):
        assert got[j].item() == pytest.approx(fkl_hand(j), rel=1e-5)


def test_tv_and_jsd():
    T = targets([True, True, True], TOPK_IDS, TOPK_P, TAIL, DRAFT, PD)
    tv = bucket_divergence("tv", logq_of(Q), T2D, T)[0, 0]
    jsd = bucket_divergence("jsd", logq_of(Q), T2D, T)[0, 0]
    for j in range(3):
        q = Q[j]
        P = TOPK_P[j] + [TAIL[j]]
        Qb = [q[i] for i in TOPK_IDS[j]] + [1 - sum(q[i] for i in TOPK_IDS[j])]
        assert tv[j].item() == pytest.approx(0.5 * sum(abs(a - b) for a, b in zip(P, Qb)), rel=1e-5)
        M = [(a + b) / 2 for a, b in zip(P, Qb)]
        kl = lambda X, M=M: sum(x * math.log(x / m) for x, m in zip(X, M) if x > 0)  # noqa: E731
        assert jsd[j].item() == pytest.approx(0.5 * kl(P) + 0.5 * kl(Qb), rel=1e-5)


def test_k3_and_bernoulli_on_drafted_token():
    T = targets([False, False, False], TOPK_IDS, TOPK_P, TAIL, DRAFT, PD)
    k3 = token_divergence("k3", logq_of(Q), T2D, T.draft_tokens, T.p_draft)[0, 0]
    be = token_divergence("bernoulli", logq_of(Q), T2D, T.draft_tokens, T.p_draft)[0, 0]
    for j in range(3):
        q, p = Q[j][DRAFT[j]], PD[j]
        r = math.log(p / q)
        assert k3[j].item() == pytest.approx(math.exp(r) - 1 - r, rel=1e-5)
        assert be[j].item() == pytest.approx(p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q)), rel=1e-5)


def test_rejection_weights_decay_from_first_rejection_and_from_block_start():
    acc = torch.tensor([[[True, False, False, False]], [[True, True, True, True]], [[False, False, False, False]]])
    valid = torch.ones_like(acc)
    w = rejection_weights(acc, valid, 0.8, "rejection")
    assert w[0, 0].tolist() == pytest.approx([0, 1, 0.8, 0.64])
    assert w[1, 0].tolist() == [0, 0, 0, 0]
    assert w[2, 0].tolist() == pytest.approx([1, 0.8, 0.64, 0.512])
    wb = rejection_weights(acc, valid, 0.8, "block")
    assert wb[0, 0].tolist() == pytest.approx([0, 0.8, 0.64, 0.512])


def test_opd_loss_joint_normalisation():
    T = targets([True, False, False], TOPK_IDS, TOPK_P, TAIL, DRAFT, PD)
    cfg = LC(lambda_acc=1.0, lambda_rej=2.0, gamma=0.5, rej_divergence="k3", acc_at_first_rejection=False)
    parts = opd_loss(logq_of(Q), T2D, T, cfg)
    acc = fkl_hand(0)
    k3 = lambda j: (lambda r: math.exp(r) - 1 - r)(math.log(PD[j] / Q[j][DRAFT[j]]))  # noqa: E731
    w = [1.0, 0.5]
    expect = (1.0 * acc + 2.0 * (w[0] * k3(1) + w[1] * k3(2))) / (1.0 * 1 + 2.0 * sum(w))
    assert parts.loss.item() == pytest.approx(expect, rel=1e-5)
    assert (parts.n_acc, parts.n_rej) == (1, 2)
    parts.loss.backward() if parts.loss.requires_grad else None


def test_gamma_one_weights_all_rejected_equally():
    T = targets([False, False, False], TOPK_IDS, TOPK_P, TAIL, DRAFT, PD)
    parts = opd_loss(logq_of(Q), T2D, T, LC(gamma=1.0, rej_divergence="bernoulli", acc_at_first_rejection=False))
    be = token_divergence("bernoulli", logq_of(Q), T2D, T.draft_tokens, T.p_draft)[0, 0]
    assert parts.loss.item() == pytest.approx(be.mean().item(), rel=1e-5)


def test_reduced_vocab_moves_unreachable_mass_to_tail():
    # draft vocab = {0, 1, 2}; target id 3 and 4 are unreachable -> their p joins the tail
    t2d = torch.tensor([0, 1, 2, -1, -1, -1])
    q = [[0.5, 0.3, 0.2]]
    T = targets([True], [[0, 3]], [[0.6, 0.3]], [0.1], [0], [0.6])
    got = bucket_divergence("fkl", torch.log(torch.tensor(q))[None, None], t2d, T)[0, 0, 0].item()
    p_tail, q_tail = 0.1 + 0.3, 1 - 0.5
    assert got == pytest.approx(0.6 * math.log(0.6 / 0.5) + p_tail * math.log(p_tail / q_tail), rel=1e-5)


def test_sft_loss_weights_steps():
    T = targets([True, True, True], TOPK_IDS, TOPK_P, TAIL, DRAFT, PD)
    w = torch.tensor([1.0, 0.8, 0.64])
    parts = sft_loss(logq_of(Q), T2D, T, w, "kl")
    expect = sum(wj * fkl_hand(j) for j, wj in enumerate(w.tolist())) / w.sum().item()
    assert parts.loss.item() == pytest.approx(expect, rel=1e-5)
    ce = sft_loss(logq_of(Q), T2D, T, w, "ce").loss.item()
    assert ce == pytest.approx(
        sum(-wj * math.log(Q[j][DRAFT[j]]) for j, wj in enumerate(w.tolist())) / w.sum().item(), rel=1e-5
    )


@pytest.mark.parametrize("div", ["k3", "bernoulli", "fkl", "tv", "jsd"])
def test_gradients_flow_and_point_the_right_way(div):
    logits = torch.zeros(1, 1, 3, V, requires_grad=True)
    T = targets([True, False, False], TOPK_IDS, TOPK_P, TAIL, DRAFT, [0.6, 0.01, 0.01])
    opd_loss(torch.log_softmax(logits, -1), T2D, T, LC(rej_divergence=div)).loss.backward()
    g = logits.grad[0, 0]
    assert g[0, 0] < 0  # accepted: raise the target's top token
    if div in ("k3", "bernoulli"):  # divergences on the drafted token alone, p(d) ~ 0: lower it
        assert g[2, DRAFT[2]] > 0
        # position 1 is also in the accepted stream (its top-k says the drafted id is the target's favourite);
        # k3's push down outweighs that pull up, the bounded Bernoulli KL's does not
        assert (g[1, DRAFT[1]] > 0) == (div == "k3")
    else:  # distribution divergences: toward the target's top-k; the drafted id 2 is in the over-weighted tail
        assert g[2, TOPK_IDS[2][0]] < 0 and g[2, DRAFT[2]] > 0


def test_first_rejected_position_is_in_both_streams_by_default():
    T = targets([True, False, False], TOPK_IDS, TOPK_P, TAIL, DRAFT, PD)
    parts = opd_loss(logq_of(Q), T2D, T, LC(gamma=0.5, rej_divergence="k3"))
    k3 = lambda j: (lambda r: math.exp(r) - 1 - r)(math.log(PD[j] / Q[j][DRAFT[j]]))  # noqa: E731
    expect = (fkl_hand(0) + fkl_hand(1) + (1.0 * k3(1) + 0.5 * k3(2))) / (2 + 1.5)
    assert parts.loss.item() == pytest.approx(expect, rel=1e-5)
    assert parts.n_acc == 2


def _cat(a: BlockTargets, b: BlockTargets) -> BlockTargets:
    return BlockTargets(
        **{f: torch.cat([getattr(a, f), getattr(b, f)]) for f in a.__dataclass_fields__ if getattr(a, f) is not None}
    )


@pytest.mark.parametrize("mode", ["opd", "sft"])
def test_ranks_with_the_all_reduced_denominator_average_to_the_global_token_mean(mode):
    """Two learner ranks, one with 2 accepted tokens and one with none: averaging their losses (what DeepSpeed's
    gradient averaging does) equals the loss of both micro-batches as one, only with the global denominator."""
    cfg = LC(gamma=0.5)
    T1 = targets([True, True, False], TOPK_IDS, TOPK_P, TAIL, DRAFT, PD)
    T2 = targets([False, False, False], TOPK_IDS, TOPK_P, TAIL, DRAFT, PD)
    q1, q2 = logq_of(Q), logq_of([Q[2], Q[0], Q[1]])
    sw = torch.tensor([1.0, 0.8, 0.64])
    if mode == "sft":
        T2.valid[..., 2] = False  # ranks with different numbers of valid positions
        loss = lambda q, T, d=None: sft_loss(q, T2D, T, sw, "kl", d).loss  # noqa: E731
    else:
        loss = lambda q, T, d=None: opd_loss(q, T2D, T, cfg, d).loss  # noqa: E731
    whole = loss(torch.cat([q1, q2]), _cat(T1, T2))
    weight = (
        (lambda T: float(sft_valid(T, T2D, sw).sum()))
        if mode == "sft"
        else (lambda T: block_weight(T, cfg).weight(cfg))
    )  # noqa: E731
    d = (weight(T1) + weight(T2)) / 2
    assert ((loss(q1, T1, d) + loss(q2, T2, d)) / 2).item() == pytest.approx(whole.item(), rel=1e-6)
    assert ((loss(q1, T1) + loss(q2, T2)) / 2).item() != pytest.approx(whole.item(), rel=1e-3)  # per-rank means differ


# --- the official recipe ---------------------------------------------------------------------------------------


def test_official_defaults_per_drafter_kind():
    from dopd.common.load import load_config

    d = load_config(None, ["drafter.kind=dflash"]).loss
    assert (d.response, d.acc_divergence, d.rej_divergence, d.lambda_rej, d.gamma, d.gamma_offset, d.clamp) == (
        "blocks",
        "bernoulli",
        "k3",
        1.0,
        0.8,
        "block",
        10.0,
    )
    e = load_config(None, ["drafter.kind=eagle3"]).loss
    assert (e.response, e.lambda_rej) == ("ttt", 0.0)  # the official EAGLE-3 recipe: full TTT, rejected stream off
    assert load_config(None, ["drafter.kind=eagle3", "loss.lambda_rej=0.5"]).loss.lambda_rej == 0.5


def test_official_dflash_loss_by_hand():
    """Block of 4 drafts, 1 accepted: accepted stream = positions 1 (accepted) and 2 (first rejection), Bernoulli
    KL on the target's top-1 token; rejected stream = k3 on drafts 2..4 weighted gamma^(j-1) from the block start
    (the first rejected token already weighs gamma^1); joint mean."""
    ids = [[0, 2], [1, 0], [3, 4], [5, 0]]
    ps = [[0.6, 0.3], [0.7, 0.2], [0.5, 0.1], [0.4, 0.3]]
    tail = [0.1, 0.1, 0.4, 0.3]
    draft = [0, 2, 2, 1]
    pd = [0.6, 0.05, 0.2, 0.3]
    Q4 = Q + [[0.1, 0.3, 0.2, 0.2, 0.1, 0.1]]
    T = targets([True, False, False, False], ids, ps, tail, draft, pd)
    cfg = load_official("dflash")
    parts = opd_loss(logq_of(Q4), T2D, T, cfg)
    bern = lambda p, q: p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))  # noqa: E731
    k3 = lambda p, q: (lambda r: math.exp(r) - 1 - r)(math.log(p / q))  # noqa: E731
    acc = bern(ps[0][0], Q4[0][ids[0][0]]) + bern(ps[1][0], Q4[1][ids[1][0]])
    w = [0.8, 0.64, 0.512]
    rej = sum(wj * k3(pd[j], Q4[j][draft[j]]) for wj, j in zip(w, (1, 2, 3)))
    assert parts.loss.item() == pytest.approx((acc + rej) / (2 + sum(w)), rel=1e-5)
    assert (parts.n_acc, parts.n_rej) == (2, 3)


def load_official(kind: str) -> LossConfig:
    from dopd.common.load import load_config

    return load_config(None, [f"drafter.kind={kind}"]).loss


def test_dopd_2511_floored_k3_and_the_loss_clamp():
    """dopd-2511's k3 (`loss.k3=floored`) with p(d) ~ 0 and q(d) ~ 1: r is floored at log p = -10, so the estimator
    is e^-10 + 9 (not e^-30 + 29: the official verl form clips that to 10, tests/test_recipes.py); the loss clamp
    then caps a position's loss at 10."""
    T = targets([False], [[1, 2]], [[0.9, 0.1]], [0.0], [0], [1e-13])
    q = [[1 - 5e-6, 1e-6, 1e-6, 1e-6, 1e-6, 1e-6]]
    got = token_divergence("k3", logq_of(q), T2D, T.draft_tokens, T.p_draft, k3="floored")[0, 0, 0].item()
    assert got == pytest.approx(math.exp(-10) + 10 - 1 - 0.0, rel=1e-4)
    big = targets([False], [[1, 2]], [[0.9, 0.1]], [0.0], [0], [0.999])
    q_small = [[1e-9, 0.5, 0.5 - 1e-9, 0, 0, 0]]
    lq = torch.log(torch.tensor(q_small).clamp_min(1e-30))[None, None]
    raw = token_divergence("k3", lq, T2D, big.draft_tokens, big.p_draft, k3="floored")[0, 0, 0].item()
    assert raw > 10  # p/q ~ e^10 before the clamp
    cfg = LC(rej_divergence="k3", k3="floored", clamp=10.0, acc_at_first_rejection=False)
    assert opd_loss(lq, T2D, big, cfg).loss.item() == pytest.approx(10.0)
    assert opd_loss(
        lq, T2D, big, LC(rej_divergence="k3", k3="floored", clamp=None, acc_at_first_rejection=False)
    ).loss.item() == pytest.approx(raw, rel=1e-5)


def test_stream_flags_route_blocks():
    """A block flagged accepted-only adds nothing to the rejected stream and vice versa (the shuffled-anchor
    ablation: shuffled blocks train the accepted stream, the true blocks only the rejected one)."""
    T = targets([True, False, False], TOPK_IDS, TOPK_P, TAIL, DRAFT, PD)
    cfg = LC(gamma=0.5, rej_divergence="k3")
    both = opd_loss(logq_of(Q), T2D, T, cfg)
    T.acc_block, T.rej_block = torch.tensor([[True]]), torch.tensor([[False]])
    acc_only = opd_loss(logq_of(Q), T2D, T, cfg)
    assert (acc_only.n_acc, acc_only.n_rej) == (2, 0)
    assert acc_only.loss.item() == pytest.approx((fkl_hand(0) + fkl_hand(1)) / 2, rel=1e-5)
    T.acc_block, T.rej_block = torch.tensor([[False]]), torch.tensor([[True]])
    rej_only = opd_loss(logq_of(Q), T2D, T, cfg)
    assert (rej_only.n_acc, rej_only.n_rej) == (0, 2) and rej_only.loss.item() != pytest.approx(both.loss.item())
    # lambda_rej = 0 turns the rejected stream off (and out of the denominator)
    off = opd_loss(
        logq_of(Q), T2D, targets([True, False, False], TOPK_IDS, TOPK_P, TAIL, DRAFT, PD), LC(lambda_rej=0.0)
    )
    assert off.n_rej == 0 and off.loss.item() == pytest.approx((fkl_hand(0) + fkl_hand(1)) / 2, rel=1e-5)


def test_sft_masks_positions_whose_target_argmax_is_outside_the_draft_vocab():
    t2d = torch.tensor([0, 1, -1, 2, 3, 4])  # id 2 is not in the draft vocabulary
    T = targets([True, True, True], [[2, 0], [1, 0], [3, 4]], TOPK_P, TAIL, DRAFT, PD)
    w = sft_valid(T, t2d, torch.ones(3))[0, 0]
    assert w.tolist() == [0.0, 1.0, 1.0]
