"""Back-of-the-envelope scaling of the dopd design past this machine: every number is a computation from the inputs
printed at the top (stated hardware figures and model shapes) plus two numbers measured on this machine.

    python bench/scale_model.py --blocks-bytes-per-token 459 --codec-mib-s 209 --ray-shard-mib-s 55

`--blocks-bytes-per-token` comes from `python bench/record_bytes.py` (SmolLM2 records; the blocks hold K draft
positions x top-k target ids/probs, independent of the target's width); the two MiB/s from
`python bench/queue_throughput.py` (one shard decoding + validating every record: in process, and as a Ray actor).
docs/scale.md is this script's output with the reasoning around it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GB = 1e9


@dataclass
class Target:
    name: str
    hidden: int
    params: float  # parameters of the target
    gpus: int  # GPUs one rollout actor uses (tensor parallel)
    drafter_params: float  # trained drafter parameters (EAGLE-3: one decoder layer + fc 3H->H + 32k draft head)


def llama_layer(h: int, inter: int, kv: int) -> float:
    return h * h * 2 + h * kv * 2 + 3 * h * inter


TARGETS = [
    Target("SmolLM2-135M", 576, 0.135e9, 1, llama_layer(576, 1536, 192) + 3 * 576 * 576 + 32000 * 576),
    Target("Llama-3.1-8B", 4096, 8.03e9, 1, llama_layer(4096, 14336, 1024) + 3 * 4096 * 4096 + 32000 * 4096),
    Target("Llama-3.1-70B", 8192, 70.6e9, 4, llama_layer(8192, 28672, 1024) + 3 * 8192 * 8192 + 32000 * 8192),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks-bytes-per-token", type=float, required=True, help="measured: bench/record_bytes.py")
    ap.add_argument(
        "--codec-mib-s", type=float, required=True, help="measured: one shard in process (queue_throughput.py)"
    )
    ap.add_argument(
        "--ray-shard-mib-s", type=float, required=True, help="measured: one shard actor on Ray (queue_throughput.py)"
    )
    ap.add_argument("--hbm-tb-s", type=float, default=3.35, help="H100 SXM HBM3 bandwidth")
    ap.add_argument("--bf16-tflops", type=float, default=989.0, help="H100 SXM dense bf16")
    ap.add_argument(
        "--decode-eff", type=float, default=0.5, help="fraction of the bandwidth roofline a decode step reaches"
    )
    ap.add_argument("--mfu", type=float, default=0.4, help="learner model-FLOPs utilisation")
    ap.add_argument("--batch", type=int, default=64, help="sequences an actor decodes at once")
    ap.add_argument("--taus", default="1,3", help="accepted tokens per verification step (1 = plain decoding)")
    ap.add_argument("--ttt", type=int, default=4, help="positions trained per token (EAGLE-3 unroll / block size K)")
    ap.add_argument("--nic-gb-s", type=float, default=12.5, help="one node's NIC (100 GbE)")
    ap.add_argument("--ib-gb-s", type=float, default=50.0, help="one GPU's InfiniBand link (400 Gb/s) for NCCL")
    ap.add_argument(
        "--quick", action="store_true", help="under 3 minutes on 2 cores: a computation: the same as without it"
    )
    a = ap.parse_args()
    from dopd.common.hardware import bench_start

    bench_start(a, None)
    taus = [float(t) for t in a.taus.split(",")]
    print("inputs: " + ", ".join(f"{k}={v}" for k, v in vars(a).items()))
    print("\n## bytes per token (3 feature layers, bf16) and per 500-token record")
    for t in TARGETS:
        feat = 3 * t.hidden * 2
        tok = feat + a.blocks_bytes_per_token + 4
        print(
            f"{t.name:14s} features {feat:6d} B/token + blocks {a.blocks_bytes_per_token:.0f} + ids 4 = {tok / 1024:6.1f} KiB/token; 500-token record {tok * 500 / 2**20:6.2f} MiB"
        )
    print("\n## one GPU rollout actor (decode at the bandwidth roofline x efficiency; replay forwards not counted)")
    rates = {}
    for t in TARGETS[1:]:
        step_s = t.params * 2 / (a.hbm_tb_s * 1e12 * t.gpus) / a.decode_eff
        tok_b = 3 * t.hidden * 2 + a.blocks_bytes_per_token + 4
        for tau in taus:
            tps = a.batch * tau / step_s
            rates[(t.name, tau)] = (tps, tps * tok_b)
            print(
                f"{t.name:14s} ({t.gpus} GPU) step {step_s * 1e3:5.1f} ms, B={a.batch}, tau={tau:g}: {tps:8.0f} tokens/s -> {tps * tok_b / 2**20:7.1f} MiB/s of records"
            )
    print("\n## one learner GPU (drafter training, 6 x params x positions FLOPs per token)")
    learn = {}
    for t in TARGETS[1:]:
        flops = 6 * t.drafter_params * a.ttt
        tps = a.bf16_tflops * 1e12 * a.mfu / flops
        tok_b = 3 * t.hidden * 2 + a.blocks_bytes_per_token + 4
        learn[t.name] = tps
        recompute = 2 * t.params / (1 if t.gpus == 1 else 1)
        print(
            f"{t.name:14s} drafter {t.drafter_params / 1e9:.2f} B params, {flops / GB:5.1f} GFLOP/token -> {tps:8.0f} tokens/s = {tps * tok_b / 2**20:7.1f} MiB/s intake;"
            f" recomputing features on the learner adds {recompute / GB:6.1f} GFLOP/token (x{(flops + recompute) / flops:.1f} learner GPUs)"
        )
    print("\n## N actors (Llama-3.1-8B and 70B, tau as above)")
    for t in TARGETS[1:]:
        drafter_bytes = t.drafter_params * 2
        for tau in taus:
            tps, bps = rates[(t.name, tau)]
            for n in (16, 128, 1024):
                agg = n * bps
                print(
                    f"{t.name:14s} tau={tau:g} N={n:5d}: records {agg / GB:8.1f} GB/s = {agg / (a.nic_gb_s * GB):7.1f} NICs of 100 GbE;"
                    f" shards at the Ray-actor rate {agg / (a.ray_shard_mib_s * 2**20):8.0f}, at the codec rate {agg / (a.codec_mib_s * 2**20):6.0f};"
                    f" learner GPUs {n * tps / learn[t.name]:6.0f}; publish {drafter_bytes / GB:.2f} GB to N actors from one NIC {n * drafter_bytes / (a.nic_gb_s * GB):7.1f} s"
                    f" vs NCCL broadcast {drafter_bytes / (a.ib_gb_s * GB) * 2:.3f} s"
                )  # fmt: skip


if __name__ == "__main__":
    main()
