"""Each named recipe's loss AND gradient on a small hand-made batch equal the official formula written out here
independently (per position, in plain torch.where / loops, not the learner's helpers), through the objective the
recipe selects: official-2605 (Bernoulli FKL with the -10 floor + verl's k3 with its clips, gamma 0.8 from the
block start, the joint mean over every response token), official-tv (exact full-vocabulary TV, positions up to the
first rejection, mean over blocks), official-eagle3 (TTT soft CE to the target over the draft vocabulary, 0.8^i)
and dopd-2511 (floored k3). Plus: what a recipe fills and refuses."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from dopd.common.errors import ConfigError
from dopd.common.load import load_config
from dopd.learner.losses import BlockTargets
from dopd.learner.objectives import objective_for

V = 6
K = 4


class FakeDrafter:
    """A drafter whose block forward IS a leaf tensor of logits (`z` [B,M,K,Vd]) and whose logits are its hidden
    state: the gradient of the loss in z is what the test compares. The target head is the identity over V, so a
    record's "hidden state" is the target's logits."""

    def __init__(self, z: torch.Tensor, draft_ids: torch.Tensor | None = None):
        self.z = z
        self.draft_ids = torch.arange(V) if draft_ids is None else draft_ids
        self.t2d = torch.full((V,), -1, dtype=torch.long)
        self.t2d[self.draft_ids] = torch.arange(self.draft_ids.numel())
        self.head_weight = torch.eye(V)
        self.lm_head = None if draft_ids is None else object()

    def block_hidden(self, *args):
        return self.z

    def logits(self, h):
        return h


def cfg_of(recipe: str, *extra: str):
    return load_config(None, ["model.target=tiny-random-llama", f"loss.recipe={recipe}", *extra])


def batch_of(T: BlockTargets, response_tokens: int):
    return SimpleNamespace(
        targets=T,
        ttt=None,
        response_tokens=response_tokens,
        tokens=None,
        features=None,
        lengths=None,
        anchors=None,
        block_tokens=None,
    )


def run_objective(cfg, drafter, batch):
    obj = objective_for(cfg, "opd")
    mask = obj.mask(batch, drafter.t2d)
    parts = obj.loss(drafter, batch, mask)
    parts.loss.backward()
    return parts


# ---------------------------------------------------------------------------------------------------------------
# official-2605: two blocks of K = 4 drafts
#   block 0: accept [T, F, F, F] -> accepted stream at offsets 1 (accepted) and 2 (first rejection, target's token);
#            rejected stream at offsets 2, 3, 4 (the drafted tokens), weights 0.8^1, 0.8^2, 0.8^3
#   block 1: accept [F, F, F, F] -> accepted stream at offset 1; rejected at 1..4, weights 1, 0.8, 0.8^2, 0.8^3
# Chosen values: block 0 offset 3's draft has r = log p - log q = -15 (confidently wrong: the k3 clip binds, zero
# gradient) and offset 4's r = +3 (> 2.61: the clip binds too); block 1 offset 1's target token has log q < -10
# (the Bernoulli floor: zero gradient from the accepted stream there).


def _logits_2605() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 2, K, V, generator=g)
    z[0, 0, 2] = torch.tensor([6.0, 0, 0, 0, 0, 0])  # draft token 0 gets q ~ 0.97
    z[0, 0, 3] = torch.tensor([-2.0, 0, 0, 0, 0, 0])  # draft token 0 gets q ~ 0.026
    z[0, 1, 0] = torch.tensor([0.0, 0, 0, -14.0, 0, 0])  # target token 3 gets log q ~ -15.6
    return z


def _targets_2605(lq0: torch.Tensor) -> BlockTargets:
    accept = torch.tensor([[[True, False, False, False], [False, False, False, False]]])
    top1 = torch.tensor([[[1, 2, 4, 5], [3, 1, 2, 0]]])
    p_top1 = torch.tensor([[[0.7, 0.6, 0.5, 0.9], [0.8, 0.4, 0.3, 0.6]]])
    draft = torch.tensor([[[1, 3, 0, 0], [5, 4, 2, 1]]])
    p_draft = torch.rand(1, 2, K, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.01
    p_draft[0, 0, 2] = math.exp(float(lq0[0, 0, 2, 0]) - 15.0)  # r = -15
    p_draft[0, 0, 3] = math.exp(float(lq0[0, 0, 3, 0]) + 3.0)  # r = +3
    ids = torch.stack([top1, (top1 + 1) % V], -1)
    probs = torch.stack([p_top1, (1 - p_top1) / 2], -1)
    return BlockTargets(ids, probs, 1 - probs.sum(-1), draft, p_draft, accept, torch.ones(1, 2, K, dtype=torch.bool))


def _ref_2605(z: torch.Tensor, T: BlockTargets, n_resp: int, k3_form: str, floor: float) -> torch.Tensor:
    """The official loss, term by term (losses.py @69b03da, verl core_algos.kl_penalty @68227b907)."""
    lq = torch.log_softmax(z, -1)
    s_acc, s_rej, w_sum = 0.0, 0.0, 0.0
    for m in range(z.shape[1]):
        n_acc = 0
        while n_acc < K and bool(T.accept[0, m, n_acc]):
            n_acc += 1
        for j in range(K):  # j = offset - 1
            if j <= n_acc:  # accepted + first rejection: Bernoulli FKL on the target's top-1 token
                t, p = int(T.topk_ids[0, m, j, 0]), torch.tensor(float(T.topk_probs[0, m, j, 0]))
                lqt = lq[0, m, j, t]
                lqt = torch.where(lqt < floor, torch.full_like(lqt, floor), lqt)
                lpt = torch.where(p.log() < floor, torch.tensor(floor), p.log())
                pp, qq = lpt.exp(), lqt.exp()
                b = pp * (lpt - lqt) + (1 - pp) * (torch.log(1 - pp) - torch.log(1 - qq))
                s_acc = s_acc + torch.where(b > 10, torch.full_like(b, 10.0), b)
            if j >= n_acc:  # rejected stream, weight 0.8^(offset - 1)
                w = 0.8**j
                d = int(T.draft_tokens[0, m, j])
                lqd, lpd = lq[0, m, j, d], torch.tensor(float(T.p_draft[0, m, j])).log()
                if k3_form == "verl":
                    r = lpd - lqd
                    r = torch.where(
                        r > 20, torch.full_like(r, 20.0), torch.where(r < -20, torch.full_like(r, -20.0), r)
                    )
                else:  # dopd-2511: both log-probs floored at -10 first
                    r = torch.where(lpd < -10, torch.tensor(-10.0), lpd) - torch.where(
                        lqd < -10, torch.full_like(lqd, -10.0), lqd
                    )
                k3 = r.exp() - r - 1
                k3 = torch.where(k3 > 10, torch.full_like(k3, 10.0), k3)
                s_rej, w_sum = s_rej + w * k3, w_sum + w
    return (s_acc + s_rej) / (n_resp + w_sum)


def test_official_2605_loss_and_gradient():
    cfg = cfg_of("official-2605")
    lc = cfg.loss
    assert (lc.acc_divergence, lc.rej_divergence, lc.k3, lc.log_floor, lc.clamp, lc.gamma, lc.gamma_offset) == (
        "bernoulli",
        "k3",
        "verl",
        -10.0,
        10.0,
        0.8,
        "block",
    )
    z0 = _logits_2605()
    T = _targets_2605(torch.log_softmax(z0, -1))
    n_resp = 13  # every answer token of the batch's records, supervised or not (the official denominator)
    z = z0.clone().requires_grad_(True)
    parts = run_objective(cfg, FakeDrafter(z), batch_of(T, n_resp))
    zr = z0.clone().requires_grad_(True)
    ref = _ref_2605(zr, T, n_resp, "verl", -10.0)
    ref.backward()
    assert parts.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(z.grad, zr.grad, rtol=1e-4, atol=1e-7)
    # the r = -15 draft (block 0, offset 3: rejected stream only) and the r = +3 draft (offset 4) get NO gradient
    assert torch.count_nonzero(z.grad[0, 0, 2]) == 0 and torch.count_nonzero(z.grad[0, 0, 3]) == 0
    # block 1 offset 1: the target token's log q < -10 is floored (no accepted-stream gradient), the draft's k3 remains
    lq = torch.log_softmax(z0, -1)
    r = math.log(float(T.p_draft[0, 1, 0])) - float(lq[0, 1, 0, 5])
    g_rej = (1 - math.exp(r)) / (n_resp + sum(0.8**j for j in range(1, K)) + sum(0.8**j for j in range(K)))
    expect = g_rej * (torch.nn.functional.one_hot(torch.tensor(5), V).float() - lq[0, 1, 0].exp())
    torch.testing.assert_close(z.grad[0, 1, 0], expect, rtol=1e-4, atol=1e-7)
    # the diagnostics see it: 2 of the 7 rejected tokens are silenced, 1 of the 3 accepted-stream positions
    assert parts.info["rej_silenced"] == pytest.approx(2 / 7) and parts.info["acc_silenced"] == pytest.approx(1 / 3)


def test_dopd_2511_floored_k3_keeps_pushing_confident_drafts():
    """The named deviation: with both log-probs floored at -10, the r = -15 draft is pushed down (gradient ~1)."""
    cfg = cfg_of("dopd-2511", "loss.acc_denominator=response_tokens", "loss.log_floor=-10")
    assert cfg.loss.k3 == "floored"
    z0 = _logits_2605()
    T = _targets_2605(torch.log_softmax(z0, -1))
    z = z0.clone().requires_grad_(True)
    parts = run_objective(cfg, FakeDrafter(z), batch_of(T, 13))
    zr = z0.clone().requires_grad_(True)
    ref = _ref_2605(zr, T, 13, "floored", -10.0)
    ref.backward()
    assert parts.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(z.grad, zr.grad, rtol=1e-4, atol=1e-7)
    assert torch.count_nonzero(z.grad[0, 0, 2]) == V  # the confidently wrong draft still gets a gradient


def test_first_rejection_only_drops_later_rejected_tokens():
    """`loss.rej_first_only` (arm H): the rejected stream keeps each block's first rejected token at weight 1."""
    cfg = cfg_of("official-2605", "loss.rej_first_only=true", "loss.lambda_acc=0")
    z0 = _logits_2605()
    T = _targets_2605(torch.log_softmax(z0, -1))
    z = z0.clone().requires_grad_(True)
    parts = run_objective(cfg, FakeDrafter(z), batch_of(T, 13))
    lq = torch.log_softmax(z0, -1)
    k3 = []
    for m, j in ((0, 1), (1, 0)):
        r = math.log(float(T.p_draft[0, m, j])) - float(lq[0, m, j, int(T.draft_tokens[0, m, j])])
        k3.append(min(math.exp(r) - r - 1, 10.0))
    assert parts.loss.item() == pytest.approx(sum(k3) / 2, rel=1e-5)  # lambda_acc 0: the normaliser is the 2 tokens
    later = torch.ones(2, K, dtype=torch.bool)
    later[0, 1] = later[1, 0] = False
    assert torch.count_nonzero(z.grad[0][later]) == 0 and torch.count_nonzero(z.grad[0][~later]) > 0


# ---------------------------------------------------------------------------------------------------------------
# official-tv: three blocks
#   block 0: accept [T, F, F, F] -> positions at offsets 1, 2 (n = 2)
#   block 1: accept [F, F, F, F] -> offset 1 (n = 1)
#   block 2: accept [T, T, T, T] -> offsets 1..4 (n = 4: no rejection, no bonus position)


def _tv_batch():
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(1, 3, K, V, generator=g)
    hid = torch.randn(1, 3, K, V, generator=g) * 2  # the target's logits (head = identity)
    accept = torch.tensor([[[True, False, False, False], [False] * 4, [True] * 4]])
    valid = torch.ones(1, 3, K, dtype=torch.bool)
    top1 = hid.argmax(-1)
    T = BlockTargets(
        top1[..., None],
        torch.full((1, 3, K, 1), 0.5),
        torch.full((1, 3, K), 0.5),
        top1,
        torch.full((1, 3, K), 0.5),
        accept,
        valid,
    )
    T.hidden, T.hidden_ok = hid, valid.clone()
    return z0, T


def test_official_tv_loss_and_gradient_over_the_full_vocabulary():
    cfg = cfg_of("official-tv")
    assert (cfg.loss.objective, cfg.loss.targets, cfg.loss.rej_first_only) == ("e2e_tv", "full", True)
    z0, T = _tv_batch()
    z = z0.clone().requires_grad_(True)
    parts = run_objective(cfg, FakeDrafter(z), batch_of(T, 99))
    zr = z0.clone().requires_grad_(True)
    blocks = []
    for m, n in ((0, 2), (1, 1), (2, 4)):
        E, run = 0.0, 1.0
        for j in range(n):
            q = torch.exp(zr[0, m, j]) / torch.exp(zr[0, m, j]).sum()
            p = torch.exp(T.hidden[0, m, j]) / torch.exp(T.hidden[0, m, j]).sum()
            d = sum(abs(q[v] - p[v]) for v in range(V)) / 2  # total variation over every id of the vocabulary
            run = run * torch.clamp(1 - d, 0, 1)
            E = E + run
        blocks.append(1 - E / n)
    ref = sum(blocks) / 3
    ref.backward()
    assert parts.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(z.grad, zr.grad, rtol=1e-4, atol=1e-7)
    # positions after the first rejection are not positions of the objective: no gradient at all
    assert torch.count_nonzero(z.grad[0, 0, 2:]) == 0 and torch.count_nonzero(z.grad[0, 1, 1:]) == 0
    assert parts.info["tv_positions"] == 7


def test_official_tv_with_a_reduced_vocabulary_puts_no_mass_outside_it():
    """A draft vocabulary (a deviation from the recipe) still measures TV over the full vocabulary: the target's
    mass on ids the drafter cannot produce counts in full."""
    from dopd.learner.losses import full_tv

    ids = torch.tensor([0, 2, 5])
    zq = torch.randn(2, 3)
    hid = torch.randn(2, V)
    got = full_tv(zq, hid, torch.eye(V), ids)
    q = torch.zeros(2, V)
    q[:, ids] = torch.softmax(zq, -1)
    want = 0.5 * (q - torch.softmax(hid, -1)).abs().sum(-1)
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------------------------
# official-eagle3: TTT blocks of 3 steps over a draft vocabulary of 4 ids {0, 1, 2, 3}; a step whose full-vocabulary
# target argmax is 4 or 5 is masked.


def test_official_eagle3_ttt_soft_ce_loss_and_gradient():
    cfg = cfg_of("official-eagle3", "drafter.draft_vocab_size=4", "loss.ttt_depth=3")
    assert (cfg.loss.response, cfg.loss.targets, cfg.loss.ttt_step_weight, cfg.loss.lambda_rej) == (
        "ttt",
        "full",
        0.8,
        0.0,
    )
    g = torch.Generator().manual_seed(5)
    Kt, ids = 3, torch.tensor([0, 1, 2, 3])
    z0 = torch.randn(1, 2, Kt, 4, generator=g)
    hid = torch.randn(1, 2, Kt, V, generator=g) * 2
    hid[0, 1, 2, 5] = 9.0  # this step's target argmax is outside the draft vocabulary: masked
    top1 = hid.argmax(-1)
    valid = torch.ones(1, 2, Kt, dtype=torch.bool)

    def blocks() -> BlockTargets:  # every position valid, labelled by the target's argmax (p 0.5, tail 0.5)
        return BlockTargets(
            top1[..., None], torch.full((1, 2, Kt, 1), 0.5), torch.full((1, 2, Kt), 0.5), top1,
            torch.full((1, 2, Kt), 0.5), valid.clone(), valid,
        )  # fmt: skip

    Tt = blocks()
    Tt.hidden, Tt.hidden_ok = hid, valid.clone()
    sw = torch.tensor([1.0, 0.8, 0.64])
    ttt = SimpleNamespace(
        targets=Tt,
        step_weight=sw,
        tokens=None,
        features=None,
        lengths=None,
        anchors=None,
        block_tokens=None,
        response_tokens=9,
    )
    # the rollout's verification blocks: none feeds a stream (lambda_rej = 0, the TTT blocks are the accepted stream)
    Tb = blocks()
    Tb.acc_block = torch.zeros(1, 2, dtype=torch.bool)
    batch = batch_of(Tb, 9)
    batch.ttt = ttt
    z = z0.clone().requires_grad_(True)
    parts = run_objective(cfg, FakeDrafter(z, ids), batch)
    zr = z0.clone().requires_grad_(True)
    total = 0.0
    for m in range(2):
        for j in range(Kt):
            if int(hid[0, m, j].argmax()) not in (0, 1, 2, 3):
                continue
            p = torch.softmax(hid[0, m, j, ids], -1)  # the target restricted to the draft vocabulary, renormalised
            total = total + 0.8**j * -(p * torch.log_softmax(zr[0, m, j], -1)).sum()
    ref = total / 9  # divided by every response token, not by the sum of 0.8^i
    ref.backward()
    assert parts.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(z.grad, zr.grad, rtol=1e-4, atol=1e-7)
    assert torch.count_nonzero(z.grad[0, 1, 2]) == 0


# ---------------------------------------------------------------------------------------------------------------
# what a recipe fills, keeps and refuses


def test_recipe_fills_unset_keys_and_keeps_set_ones_as_deviations():
    from dopd.common.recipes import recipe_named

    cfg = cfg_of("official-2605", "loss.gamma=0.9")
    assert cfg.loss.gamma == 0.9 and cfg.drafter.kind == "dflash" and cfg.drafter.draft_vocab_size is None
    assert ("loss.gamma", 0.9, 0.8) in recipe_named("official-2605").deviations(cfg)


@pytest.mark.parametrize(("recipe", "bad"), [
    ("official-2605", "drafter.draft_vocab_size=64"),
    ("official-2605", "drafter.train_lm_head=true"),
    ("official-tv", "loss.targets=topk"),
    ("official-eagle3", "drafter.kind=dflash"),
])  # fmt: skip
def test_recipe_refuses_what_defines_it(recipe, bad):
    with pytest.raises(ConfigError, match=bad.split("=")[0]):
        cfg_of(recipe, bad)


def test_unknown_recipe_is_named():
    with pytest.raises(ConfigError, match="loss.recipe"):
        cfg_of("official-2099")


def test_readme_lists_every_recipe_difference():
    """docs/recipes.md's recipe table is the recipes' own (regenerate it with `common.recipes.recipe_table()`)."""
    from pathlib import Path

    from dopd.common.recipes import recipe_table

    assert recipe_table() in (Path(__file__).parents[1] / "docs" / "recipes.md").read_text()


def test_every_citation_names_a_row_of_docs_recipes_md():
    """Each `[docs/recipes.md R..]` citation in the code and docs names rows that exist (a row removed or renumbered
    fails here with the file), and no file cites a path outside the repository (../shared, ../notes)."""
    import re
    import subprocess
    from pathlib import Path

    root = Path(__file__).parents[1]
    rows = set(re.findall(r"^\| (R\d+) \|", (root / "docs" / "recipes.md").read_text(), re.M))
    assert {"R1", "R10", "R17", "R20"} <= rows
    files = subprocess.run(["git", "ls-files", "*.py", "*.md"], cwd=root, capture_output=True, text=True).stdout.split()
    cited, bad = 0, []
    for f in files:
        text = (root / f).read_text()
        bad += [f"{f}: {m}" for m in re.findall(r"\.\./(?:shared|notes)/\S+", text)]
        for group in re.findall(r"\[docs/recipes\.md ([^\]]+)\]", text):
            for a, b in re.findall(r"R(\d+)(?:\s*-\s*R(\d+))?", group):
                named = {f"R{i}" for i in range(int(a), int(b or a) + 1)}
                cited += 1
                bad += [f"{f}: [docs/recipes.md {group}] names {r}, not a row" for r in sorted(named - rows)]
    assert cited > 20 and not bad, bad
