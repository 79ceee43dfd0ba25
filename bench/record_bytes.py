"""Bytes per experience record and per token, measured on real records from a rollout worker (no Ray).

    python bench/record_bytes.py --target smollm2-135m --prompts 4 --max-new-tokens 96

One `RolloutWorker.produce()` batch with the default config (EAGLE-3 drafter, its 3 feature layers in bf16, the
replay blocks with the target's top-k, the target's final hidden state along the answer for the replay-mismatch
diagnostic): prints each record's wire size split into features, blocks, hidden state and the rest, and the totals
per token. docs/scale.md starts from these numbers.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--quick", action="store_true", help="under 3 minutes on 2 cores: 2 prompts x 48 tokens")
    a = ap.parse_args()
    from dopd.common.hardware import bench_start

    bench_start(a, dict(prompts=2, max_new_tokens=48))
    from transformers import AutoTokenizer

    from dopd.actors.actor import RolloutWorker
    from dopd.common.load import load_config
    from dopd.common.models import resolve_target
    from dopd.common.record import decode_record
    from dopd.prompts import encode_all, load_prompt_set

    cfg = load_config(
        None,
        [f"model.target={a.target}", f"rollout.max_new_tokens={a.max_new_tokens}", f"rollout.batch_size={a.prompts}"],
    )
    tok = AutoTokenizer.from_pretrained(resolve_target(a.target, quiet=True))
    ids, ps = encode_all(tok, load_prompt_set("champ")[: a.prompts * 4], cfg.data.max_prompt_tokens, drop_long=True)
    w = RolloutWorker(cfg, 0, [(p.id, i) for p, i in zip(ps, ids)][: a.prompts])
    w.policy_version = 0
    data, _ = w.produce()
    tot = {"bytes": 0, "tokens": 0, "features": 0, "blocks": 0, "positions": 0, "hidden": 0, "answer": 0}
    F = None
    for d in data:
        r = decode_record(d)
        feats = r.features.numel() * r.features.element_size() if r.features is not None else 0
        F = r.features.shape[1] if r.features is not None else F
        blocks = sum(getattr(r.blocks, f).nbytes for f in r.blocks.FIELDS)
        tot["bytes"] += len(d)
        tot["tokens"] += r.num_tokens
        tot["features"] += feats
        tot["blocks"] += blocks
        tot["positions"] += len(r.blocks) * r.blocks.block_size
        tot["hidden"] += 0 if r.target_hidden is None else r.target_hidden.numel() * r.target_hidden.element_size()
        tot["answer"] += r.num_tokens - r.prompt_len
        print(
            f"record {r.prompt_id:>10s}: {len(d) / 1024:8.1f} KiB, {r.num_tokens} tokens ({r.num_tokens - r.prompt_len} new), {len(r.blocks)} blocks x K={r.blocks.block_size}; features {feats / 1024:.1f} KiB, blocks {blocks / 1024:.1f} KiB"
        )
    n = len(data)
    print(f"target {a.target}: feature width F = {F} ({cfg.drafter.kind}, bf16), top-k {cfg.rollout.topk}")
    print(f"mean record: {tot['bytes'] / n / 1024:.1f} KiB, {tot['tokens'] / n:.0f} tokens")
    print(
        f"bytes per token: {tot['bytes'] / tot['tokens']:.0f} total = features {tot['features'] / tot['tokens']:.0f} + blocks {tot['blocks'] / tot['tokens']:.0f} + other {(tot['bytes'] - tot['features'] - tot['blocks']) / tot['tokens']:.0f}"
    )
    print(f"blocks: {tot['blocks'] / max(tot['positions'], 1):.0f} bytes per drafted position")
    print(
        f"target hidden state (metrics.replay_kl / loss.targets=full): {tot['hidden'] / n / 1024:.1f} KiB per record, "
        f"{tot['hidden'] / max(tot['answer'], 1):.0f} B per answer token, {tot['hidden'] / tot['bytes']:.1%} of the bytes"
    )


if __name__ == "__main__":
    main()
