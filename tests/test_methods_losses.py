"""DVI's online schedule and Bebop's end-to-end objective: the policy gradient's sign, the KL -> RL switch, the
expected accepted length against Monte-Carlo rejection sampling on a tiny model, and the config rules."""

from __future__ import annotations

import json

import pytest
import torch

from dopd.common.config import DVIConfig, LossConfig
from dopd.common.errors import ConfigError
from dopd.common.load import load_config
from dopd.common.specdec import DecodeSettings, SpecEngine
from dopd.learner.losses import BlockTargets, bucket_divergence, dvi_phase, dvi_sums, e2e_sums, expected_length, finish

V = 5
T2D = torch.arange(V)


def block(accept, draft, topk_ids, topk_probs, tail, p_draft) -> BlockTargets:
    a = torch.tensor(accept)[None, None]
    K = a.shape[-1]
    return BlockTargets(
        topk_ids=torch.tensor(topk_ids)[None, None], topk_probs=torch.tensor(topk_probs)[None, None],
        tail=torch.tensor(tail)[None, None], draft_tokens=torch.tensor(draft)[None, None],
        p_draft=torch.tensor(p_draft)[None, None], accept=a, valid=torch.ones(1, 1, K, dtype=torch.bool),
    )  # fmt: skip


LC = LossConfig(objective="dvi", response="blocks", acc_divergence="fkl", lambda_rej=0.0, clamp=None)
# a block of K = 3: d_1 = 0 accepted, d_2 = 1 rejected (the first rejection), d_3 = 2 after it (not a sample)
T = block(
    [True, False, False],
    [0, 1, 2],
    [[0, 3], [2, 1], [4, 0]],
    [[0.7, 0.2], [0.6, 0.3], [0.5, 0.4]],
    [0.1, 0.1, 0.1],
    [0.7, 0.3, 0.0],
)


def test_policy_gradient_raises_the_accepted_token_and_lowers_the_rejected_one():
    logits = torch.zeros(1, 1, 3, V, requires_grad=True)
    d = DVIConfig(rl_start_step=0, kl_weight=0.0, ce_weight=0.0, pg_weight=1.0)
    s, phase = dvi_sums(torch.log_softmax(logits, -1), T2D, T, LC, d, step=0)
    assert phase == "rl"
    finish(s, LC).loss.backward()
    with torch.no_grad():
        q0 = torch.softmax(logits, -1)
        q1 = torch.softmax(logits - 1.0 * logits.grad, -1)
    assert q1[0, 0, 0, 0] > q0[0, 0, 0, 0] + 1e-3  # the accepted draft's probability rises
    assert q1[0, 0, 1, 1] < q0[0, 0, 1, 1] - 1e-3  # the rejected draft's falls
    assert torch.all(logits.grad[0, 0, 2] == 0)  # past the first rejection: not a sample
    # baseline b = mean reward over the 2 samples = 0.5: by hand, loss = (-(1 - .5) log q_1(0) - (0 - .5) log q_2(1)) / 2
    logq = torch.log_softmax(torch.randn(1, 1, 3, V, generator=torch.Generator().manual_seed(3)), -1)
    s, _ = dvi_sums(logq, T2D, T, LC, d, step=0)
    by_hand = (-0.5 * logq[0, 0, 0, 0] + 0.5 * logq[0, 0, 1, 1]) / 2
    assert float(finish(s, LC).loss) == pytest.approx(float(by_hand), abs=1e-6)


def test_reward_masked_cross_entropy_only_on_accepted_drafts():
    logits = torch.zeros(1, 1, 3, V, requires_grad=True)
    d = DVIConfig(rl_start_step=0, kl_weight=0.0, ce_weight=1.0, pg_weight=0.0)
    s, _ = dvi_sums(torch.log_softmax(logits, -1), T2D, T, LC, d, step=0)
    s.acc.backward()
    assert logits.grad[0, 0, 0, 0] < 0 and torch.all(logits.grad[0, 0, 1:] == 0)
    assert float(s.acc) == pytest.approx(-float(torch.log_softmax(torch.zeros(V), -1)[0]), abs=1e-6) and s.n_acc == 2


def test_dvi_schedule_switches_at_the_configured_step():
    logq = torch.log_softmax(torch.randn(1, 1, 3, V, generator=torch.Generator().manual_seed(0)), -1)
    d = DVIConfig(rl_start_step=7, kl_weight=0.25, ce_weight=1.0, pg_weight=2.0)
    kl = bucket_divergence("fkl", logq, T2D, T)[0, 0, :2].sum()
    for step in (0, 6):
        s, phase = dvi_sums(logq, T2D, T, LC, d, step)
        assert phase == "kl" and float(s.acc) == pytest.approx(float(kl), rel=1e-6)
    lq = logq[0, 0, [0, 1], [0, 1]]
    r = torch.tensor([1.0, 0.0])
    rl = 0.25 * kl + (-r * lq).sum() - 2.0 * ((r - 0.5) * lq).sum()
    for step in (7, 100):
        s, phase = dvi_sums(logq, T2D, T, LC, d, step)
        assert phase == "rl" and float(s.acc) == pytest.approx(float(rl), rel=1e-6)
    assert dvi_phase(10**6, DVIConfig()) == "kl"  # rl_start_step None: KL only


@pytest.mark.heavy
def test_dvi_phase_switches_in_the_in_process_runner(tmp_path, tiny):
    """DVI end to end on the tiny target: SFT warm-up, online KL, then RL from the configured learner step."""
    from dopd.local import InProcess
    from dopd.train import train

    cfg = load_config(None, [
        "model.target=tiny-random-llama", "data.prompts=champ-problems", "data.num_eval=4", "sft.num_prompts=16",
        "sft.max_new_tokens=24", "rollout.max_new_tokens=24", "eval.max_new_tokens=16", "eval.num_prompts=2",
        "learner.micro_batch_size=2", "learner.refresh_every=2", "drafter.kind=dvi", "drafter.lora_rank=4",
        "mode=opd", "sft.warmup_steps=2", "learner.steps=4", "dvi.rl_start_step=4", "learner.eval_every=100",
        "learner.checkpoint_every=100", f"out_dir={tmp_path}",
    ])  # fmt: skip
    train(cfg, InProcess(cfg, target=tiny, log=lambda *a: None))
    steps = [json.loads(x) for x in open(tmp_path / "metrics.jsonl") if json.loads(x)["event"] == "step"]
    assert [(r["phase"], r.get("dvi_phase")) for r in steps] == [("sft", None)] * 2 + [("opd", "kl")] * 2 + [
        ("opd", "rl")
    ] * 2
    assert all(r["n_acc"] > 0 for r in steps[2:])


def test_expected_length_by_hand():
    tv = torch.tensor([[0.2, 0.5, 0.1]])
    valid = torch.ones(1, 3)
    a = 1 - tv[0]
    assert float(expected_length(tv, valid)) == pytest.approx(float(a[0] + a[0] * a[1] + a[0] * a[1] * a[2]))
    ratio = torch.tensor([[0.9, 0.3, 1.0]])
    assert float(expected_length(tv, valid, ratio)) == pytest.approx(float(a[0] + 0.9 * a[1] + 0.9 * 0.3 * a[2]))
    valid[0, 1] = 0  # an invalid position ends the chain
    assert float(expected_length(tv, valid)) == pytest.approx(float(a[0]))


def test_bucket_tv_bounds_the_true_tv():
    """TV_bucket <= TV <= TV_bucket + min(p_tail, q_tail) (the docstring's bound), on random distributions."""
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        p = torch.softmax(torch.randn(12, generator=g) * 2, -1)
        q = torch.softmax(torch.randn(12, generator=g) * 2, -1)
        k = 4
        ids = p.topk(k).indices
        Tb = BlockTargets(
            ids[None, None, None],
            p[ids][None, None, None],
            (1 - p[ids].sum())[None, None, None],
            ids[None, None, None, :1],
            p[ids[:1]][None, None, None],
            torch.ones(1, 1, 1, dtype=torch.bool),
            torch.ones(1, 1, 1, dtype=torch.bool),
        )
        tvb = float(bucket_divergence("tv", torch.log(q)[None, None, None], torch.arange(12), Tb))
        tv = 0.5 * float((p - q).abs().sum())
        mask = torch.ones(12, dtype=torch.bool)
        mask[ids] = False
        assert tvb <= tv + 1e-6 <= tvb + min(float(p[mask].sum()), float(q[mask].sum())) + 2e-6


def _records_at_T1(target, drafter, prompts, K, seeds):
    out = []
    for seed in seeds:
        res, _ = SpecEngine(target, drafter).generate(prompts, DecodeSettings(
            block_size=K, temperature=1.0, max_new_tokens=24, batch_size=3, record=True, keep_features=True,
            topk=target.info.vocab_size, seed=seed))  # fmt: skip
        out += res
    return out


@pytest.mark.heavy
def test_expected_length_matches_monte_carlo_rejection_sampling(tiny, tiny_prompts, trained_tiny_drafter):
    """The path estimator of E[accepted], computed by the learner from the records (the current drafter's q by its
    training forward, the target's full distribution: top-k = vocabulary), has the same expectation as the accepted
    count rejection sampling actually produced, step by step: their paired difference averages to 0 within its SE.
    A plausible wrong formula (sum_j (1 - TV_j), no product) is rejected by the same data, so the test can fail."""
    d = trained_tiny_drafter
    K = 3
    lc = LossConfig(objective="expected_length", response="blocks", acc_divergence="fkl", lambda_rej=0.0, clamp=None)
    acc_n, est_path, est_naive = [], [], []
    for r in _records_at_T1(tiny, d, tiny_prompts, K, seeds=range(6)):
        seq = torch.tensor([r.prompt_ids + r.output_ids])
        feats = torch.zeros(1, seq.shape[1], r.features.shape[1])
        feats[0, : r.features.shape[0]] = r.features
        anchors = torch.tensor([[s.prefix_len for s in r.steps]])
        blocks = torch.tensor([[list(s.draft_tokens) for s in r.steps]])
        with torch.no_grad():
            logq = torch.log_softmax(
                d.logits(d.block_hidden(seq, feats, torch.tensor([seq.shape[1]]), anchors, blocks)).float(), -1
            )
        st = r.steps
        Tb = BlockTargets(
            topk_ids=torch.tensor([[s.target_topk_ids for s in st]]).long(), topk_probs=torch.tensor([[s.target_topk_probs for s in st]]),
            tail=torch.tensor([[s.target_tail for s in st]]), draft_tokens=blocks, p_draft=torch.tensor([[s.target_draft_prob for s in st]]),
            accept=torch.tensor([[list(s.accept_mask) for s in st]]), valid=torch.ones(1, len(st), K, dtype=torch.bool),
        )  # fmt: skip
        tv = bucket_divergence("tv", logq, d.t2d, Tb)[0]
        lq = logq.gather(-1, blocks[..., None]).squeeze(-1)[0]
        ratio = torch.exp((torch.log(Tb.p_draft[0].clamp_min(1e-12)) - lq).clamp(max=0))
        est_path += expected_length(tv, torch.ones_like(tv), ratio).tolist()
        est_naive += (1 - tv).sum(-1).tolist()
        acc_n += [int(s.accept_mask.sum()) for s in st]
        # the loss the learner optimises is minus the mean of the same estimator
        s_ = e2e_sums(logq, d.t2d, Tb, lc)
        assert float(s_.acc) == pytest.approx(-sum(expected_length(tv, torch.ones_like(tv), ratio).tolist()), rel=1e-5)
    a, e, nv = (
        torch.tensor(acc_n, dtype=torch.float64),
        torch.tensor(est_path, dtype=torch.float64),
        torch.tensor(est_naive, dtype=torch.float64),
    )
    n = a.numel()
    diff = a - e
    se = float(diff.std() / n**0.5)
    print(
        f"\nsteps {n}: MC accepted {float(a.mean()):.4f}, expected-length estimator {float(e.mean()):.4f}, diff SE {se:.4f}"
    )
    assert n > 400 and 0.1 < float(a.mean()) < K - 0.1  # partial acceptance: both accept and reject paths
    assert abs(float(diff.mean())) < 3.5 * se
    se_naive = float((a - nv).std() / n**0.5)
    assert abs(float((a - nv).mean())) > 3.5 * se_naive


def test_method_config_rules():
    base = ["model.target=tiny-random-llama"]
    cfg = load_config(None, base + ["drafter.kind=dvi"])
    lc = cfg.loss
    assert (lc.objective, lc.response, lc.acc_divergence, lc.lambda_rej) == ("dvi", "blocks", "fkl", 0.0)
    with pytest.raises(ConfigError, match="lambda_rej"):
        load_config(None, base + ["drafter.kind=dvi", "loss.lambda_rej=1"])
    with pytest.raises(ConfigError, match="replay"):
        load_config(None, base + ["loss.objective=dvi", "replay.extra=error"])
    with pytest.raises(ConfigError, match="temperature=1"):
        load_config(None, base + ["loss.objective=expected_length"])
    cfg = load_config(None, base + ["loss.objective=expected_length", "rollout.temperature=1"])
    assert cfg.loss.response == "blocks" and cfg.loss.lambda_rej == 0.0
    with pytest.raises(ConfigError, match="unknown config key 'dvi.rl_start'"):
        load_config(None, base + ["dvi.rl_start=3"])
    assert load_config(None, base).loss.objective == "opd"  # Draft-OPD unchanged by default


def _exact_and_mc_gradients(score: bool, repeats: int = 24, n: int = 1500):
    """K = 2 blocks over a 4-token vocabulary, the drafter's q_1 = softmax(theta_1), q_2 = softmax(theta_2[d_1]), the
    target's p_1, p_2(.|d_1) fixed. Exact: E[accepted] = sum_d min(p_1, q_1)(d) * (1 + sum_x min(p_2(x|d), q_2(x|d))),
    differentiated by autograd; Monte Carlo: the learner's loss on blocks drafted from q (mean over `repeats`)."""
    g = torch.Generator().manual_seed(0)
    V = 4
    th1 = torch.randn(V, generator=g, dtype=torch.float64)
    th2 = torch.randn(V, V, generator=g, dtype=torch.float64)
    p1 = torch.softmax(torch.randn(V, generator=g, dtype=torch.float64), -1)
    p2 = torch.softmax(2 * torch.randn(V, V, generator=g, dtype=torch.float64), -1)
    t1, t2 = th1.clone().requires_grad_(), th2.clone().requires_grad_()
    q1, q2 = torch.softmax(t1, -1), torch.softmax(t2, -1)
    exact = (torch.minimum(p1, q1) * (1 + torch.minimum(p2, q2).sum(-1))).sum()
    ge = torch.autograd.grad(exact, (t1, t2))
    ge = torch.cat([x.flatten() for x in ge])
    lc = LossConfig(
        objective="expected_length",
        response="blocks",
        acc_divergence="fkl",
        lambda_rej=0.0,
        clamp=None,
        e2e_score=score,
    )
    ests = []
    for _ in range(repeats):
        t1, t2 = th1.clone().requires_grad_(), th2.clone().requires_grad_()
        q1, q2 = torch.softmax(t1, -1), torch.softmax(t2, -1)
        d1 = torch.multinomial(q1.detach(), n, replacement=True, generator=g)
        d2 = torch.multinomial(q2.detach()[d1], 1, generator=g)[:, 0]
        logq = torch.stack([torch.log(q1).expand(n, V), torch.log(q2[d1])], 1)[None]  # [1, n, 2, V]
        pk = torch.stack([p1.expand(n, V), p2[d1]], 1)[None]
        draft = torch.stack([d1, d2], 1)[None]
        T = BlockTargets(
            topk_ids=torch.arange(V).expand(1, n, 2, V), topk_probs=pk, tail=torch.zeros(1, n, 2, dtype=torch.float64),
            draft_tokens=draft, p_draft=pk.gather(-1, draft[..., None])[..., 0], accept=torch.zeros(1, n, 2, dtype=torch.bool),
            valid=torch.ones(1, n, 2, dtype=torch.bool),
        )  # fmt: skip
        s = e2e_sums(logq, torch.arange(V), T, lc)
        gm = torch.autograd.grad(-s.acc / s.n_acc, (t1, t2))  # the gradient of the estimated E[accepted]
        ests.append(torch.cat([x.flatten() for x in gm]))
    est = torch.stack(ests)
    return ge, est.mean(0), est.std(0) / repeats**0.5


def test_expected_length_gradient_matches_the_exact_gradient():
    """With the score-function term the learner's gradient of E[accepted] is unbiased: every one of its 20
    components agrees with autograd on the exact expectation within 4 SE. The formula's own gradient alone (the
    drafts treated as fixed) misses the part that comes from sampling d ~ q and is rejected by the same check."""
    exact, mean, se = _exact_and_mc_gradients(score=True)
    z = (mean - exact).abs() / se.clamp_min(1e-6)
    print(f"\nscore term on: max |z| {float(z.max()):.2f}, exact grad norm {float(exact.norm()):.3f}")
    assert float(z.max()) < 4.0
    exact, mean, se = _exact_and_mc_gradients(score=False)
    z = (mean - exact).abs() / se.clamp_min(1e-6)
    print(f"score term off: max |z| {float(z.max()):.2f}")
    assert float(z.max()) > 8.0
