"""`dopd-experiments` (also `python -m dopd.experiments`): the experiments' own command line, outside the core CLI.

plateau, methods and render drive runs through dopd's public API (experiments/__init__.py); the core `dopd` command
knows nothing of them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from dopd.cli import _fail, _setup_torch
from dopd.common.errors import DopdError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Reproducible experiments on dopd that write their plots and numbers (needs the `experiments` extra).",
)


@app.command("plateau", context_settings={"allow_extra_args": True})
def experiment_plateau(
    ctx: typer.Context,
    out: Path = typer.Option(..., help="output directory (a rerun skips the warm-up and every finished arm and seed)"),
    preset: str = typer.Option("cpu", help="cpu | gpu | smoke"),
    arms: str = typer.Option(
        "A,B,G,C,D,H,P", help="comma-separated arms of A B G C D H P E F (experiments/plateau.py)"
    ),
    seeds: int | None = typer.Option(None, help="seeds of arms A, B, G, C (default: the preset's)"),
    drafter: str = typer.Option("dflash", help="dflash | eagle3"),
    report: Path | None = typer.Option(None, help="also write the reports here (e.g. docs/plateau)"),
    threads: int | None = typer.Option(None, help="torch CPU threads"),
) -> None:
    """SFT vs Draft-OPD vs its ablations from one gated warm-up, with seeds and paired bootstrap contrasts."""
    _setup_torch(threads)
    from dopd.experiments.plateau import main_plateau

    chosen = tuple(a.strip() for a in arms.split(",") if a.strip())
    try:
        summary = main_plateau(out, preset, list(ctx.args), chosen, seeds, drafter, report)
    except DopdError as e:
        _fail(e)
    typer.echo(json.dumps({k: summary[k] for k in ("gate", "tau_final", "tau_se", "contrasts")}, indent=1))


@app.command("methods", context_settings={"allow_extra_args": True})
def experiment_methods(
    ctx: typer.Context,
    out: Path = typer.Option(..., help="output directory (re-running skips finished arms and evaluations)"),
    preset: str = typer.Option("cpu", help="cpu | gpu | smoke"),
    arms: str = typer.Option(
        ",".join(("sft_kl", "opd_kl", "bebop_tv", "bebop_e2e", "dvi_kl", "dvi_kl_rl", "eagle3_kl_rl")),
        help="comma-separated subset of the arms",
    ),
    threads: int | None = typer.Option(None, help="torch CPU threads"),
) -> None:
    """Draft-OPD, Bebop (T = 1) and DVI (T = 0) from shared warm-ups at the same learner budget; tau +- SE."""
    _setup_torch(threads)
    from dopd.experiments.methods import ARMS, PRESETS, main_methods

    chosen = tuple(a.strip() for a in arms.split(",") if a.strip())
    bad = [a for a in chosen if a not in ARMS]
    if preset not in PRESETS or bad or not chosen:
        _fail(
            DopdError(
                f"unknown preset '{preset}' (known: {', '.join(PRESETS)})"
                if preset not in PRESETS
                else f"unknown arms {bad} (known: {', '.join(ARMS)})"
            )
        )
    try:
        summary = main_methods(out, preset, list(ctx.args), chosen)
    except DopdError as e:
        _fail(e)
    typer.echo(
        json.dumps(
            {a: {k: round(v["tau"], 4) for k, v in r["final"]["results"].items()} for a, r in summary["arms"].items()},
            indent=1,
        )
    )


@app.command("render")
def experiment_render(
    report: Path = typer.Argument(
        ..., help="a report directory: an experiment's --out / --report, docs/plateau, docs/methods"
    ),
) -> None:
    """Re-render an experiment's reports (tables, plot) from its recorded results, without training anything."""
    from dopd.experiments import methods, plateau, serve_shift

    if (report / "results.json").is_file() and "traffic_ids" in json.loads((report / "results.json").read_text()):
        serve_shift.render_report(report)
        typer.echo(f"re-rendered {report / 'report.md'} from {report / 'results.json'}")
    elif (report / "results.json").is_file():
        methods.render_report(report)
        typer.echo(f"re-rendered {report / 'results.csv'} and {report / 'summary.md'} from {report / 'results.json'}")
    elif (report / "summary.json").is_file() and (report / "results.csv").is_file():
        try:
            plateau.render_report(report)
        except DopdError as e:
            _fail(e)
        typer.echo(f"re-rendered {report / 'summary.md'} and {report / 'plot.png'} from summary.json and results.csv")
    else:
        _fail(DopdError(f"{report} holds no experiment results (results.json, or summary.json + results.csv)"))


@app.command("serve-shift")
def experiment_serve_shift(
    out: Path = typer.Option(Path("runs/serve-shift"), help="working directory: the learning run, logs, evaluations"),
    drafter: Path = typer.Option(Path("runs/demo/drafter"), help="the served drafter (make run's: trained on champ)"),
    quick: bool = typer.Option(False, help="a smoke run of a few minutes (tiny traffic, 4 learner steps)"),
    seed: int = typer.Option(0, help="data.seed of the humaneval split and seed of the learning run"),
    meaningful: float = typer.Option(0.05, help="the smallest tau change worth finding (the powered-null rule)"),
    report: Path | None = typer.Option(None, help="also copy report.md, results.json, live_tau.jsonl here"),
    held_out: int | None = typer.Option(None, help="held-out humaneval prompts (default 32; quick 8)"),
    traffic: int | None = typer.Option(None, help="traffic prompts (default 48; quick 16)"),
    champ_prompts: int | None = typer.Option(None, help="held-out champ prompts (default 16; quick 4)"),
    max_tokens: int | None = typer.Option(None, help="tokens per answer, served and evaluated (default 128; quick 32)"),
    steps: int | None = typer.Option(None, help="learner.steps of the learning run (default 24; quick 4)"),
    refresh_every: int | None = typer.Option(None, help="learner.refresh_every (default 4; quick 2)"),
    concurrency: int | None = typer.Option(None, help="concurrent client requests (default 8)"),
    deadline_s: float | None = typer.Option(None, help="give up serving after this many seconds (default 1500)"),
    learn_set: list[str] | None = typer.Option(
        None, help="key=value setting of the learning run, repeatable (e.g. learner.opd_lr=2e-4); default: none"
    ),
    threads: int | None = typer.Option(2, help="torch CPU threads of the evaluating process"),
) -> None:
    """`dopd serve --learn` on shifted traffic: a maths drafter serving code prompts, tau before/after on held-out
    code (transfer) and held-out maths (forgetting), the live-tau curve, the lossless check (experiments/serve_shift.py)."""
    _setup_torch(threads)
    from dopd.experiments.serve_shift import main_serve_shift

    sizes = dict(held_out=held_out, traffic=traffic, champ_prompts=champ_prompts, max_tokens=max_tokens, steps=steps,
                 refresh_every=refresh_every, concurrency=concurrency, deadline_s=deadline_s,
                 learn=learn_set or None)  # fmt: skip
    try:
        argv = " ".join(["python -m dopd.experiments", *sys.argv[1:]])
        res = main_serve_shift(out, drafter, quick, seed, meaningful, report, command=argv, **sizes)
    except DopdError as e:
        _fail(e)
    typer.echo(
        json.dumps({"verdict": res["verdict"], "paired": res["paired"], "wall_s": round(res["wall_s"])}, indent=1)
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
