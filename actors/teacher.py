"""Target-written SFT data: the target answers the training prompts, then scores its own answers.

The SFT baselines (and the warm-up before on-policy training) learn from text the target itself generated
(plain target decoding, greedy by default) with teacher forcing: at every position the target's features and its
top-k next-token distribution. This is actor-side work (it runs the target); the learner only sees TeacherRecords.
"""

from __future__ import annotations

import numpy as np
import torch

from dopd.common.models import Target
from dopd.common.record import TeacherRecord
from dopd.common.specdec import DecodeSettings, SpecEngine


def regenerate(target: Target, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float, batch_size: int, seed: int, progress=None) -> list[list[int]]:
    """Plain target decoding of every prompt; returns the answers' token ids."""
    settings = DecodeSettings(block_size=0, temperature=temperature, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    results, _ = SpecEngine(target, None).generate(prompt_ids, settings, progress=progress)
    return [r.output_ids for r in results]


@torch.no_grad()
def teacher_records(
    target: Target,
    feature_layers: list[int],
    items: list[tuple[str, list[int], int]],
    topk: int,
    batch_size: int = 4,
    feature_dtype: torch.dtype = torch.bfloat16,
) -> list[TeacherRecord]:
    """Teacher-forced scoring of (prompt_id, token_ids, prompt_len) sequences: features and top-k per position."""
    dev = target.device
    out: list[TeacherRecord] = []
    for c in range(0, len(items), batch_size):
        chunk = items[c : c + batch_size]
        S = max(len(t) for _, t, _ in chunk)
        ids = torch.zeros(len(chunk), S, dtype=torch.long, device=dev)
        am = torch.zeros(len(chunk), S, dtype=torch.long, device=dev)
        for i, (_, t, _) in enumerate(chunk):
            ids[i, : len(t)] = torch.tensor(t, device=dev)
            am[i, : len(t)] = 1
        o = target.model.model(input_ids=ids, attention_mask=am, output_hidden_states=True, use_cache=False)
        feats = torch.cat([o.hidden_states[i] for i in feature_layers], dim=-1)
        for i, (pid, t, plen) in enumerate(chunk):
            n = len(t)
            lsm = torch.log_softmax(target.lm_head(o.last_hidden_state[i, : n - 1]).float(), dim=-1)
            tk = lsm.topk(topk, dim=-1)
            p = tk.values.exp()
            out.append(
                TeacherRecord(
                    prompt_id=pid,
                    token_ids=np.asarray(t, dtype=np.int32),
                    prompt_len=plen,
                    features=feats[i, : n - 1].to(feature_dtype).cpu(),
                    topk_ids=tk.indices.cpu().numpy().astype(np.int32),
                    topk_probs=p.cpu().numpy(),
                    tail=(1 - p.sum(-1)).clamp_min(0).cpu().numpy(),
                )
            )
    return out
