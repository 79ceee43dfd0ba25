"""`dopd serve --learn`: serve with a drafter and train it on what is served, in one Ray job.

Two halves that share only the traffic feed (dopd/traffic.py): the Serve app (dopd/serve.py) answers requests and
offers each finished one's token ids to the feed; a `dopd train` run with `rollout.source=traffic` (its actors
re-segment the served answers with the current drafter, its ZeRO learners train on the records, every
`learner.refresh_every` steps it publishes) runs in a thread of this process. Replicas poll the feed for the newest
weights and swap them in between engine steps. Serving never waits for learning, and the learning thread ending,
by its schedule or by an error, never stops the server: it is logged and serving goes on with the weights the
replicas hold.

The learning run is an ordinary run directory (`--out`, default runs/serve): config.yaml, metrics.jsonl,
opd_sequences.jsonl (the trained records' token ids: the only place served text is written), checkpoints/ and at the
end drafter/; `dopd serve --learn --resume DIR` continues it and `dopd export DIR/drafter` exports it.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from dopd.common.config import Config
from dopd.common.errors import DopdError
from dopd.common.load import load_config

# what `--learn` sets over the user's config: learn from the traffic, start from the served drafter, no warm-up
FORCED = ["runner=ray", "mode=opd", "sft.warmup_steps=0", "rollout.source=traffic", "cluster.rollout=async"]


def learn_config(
    target: str,
    drafter: str | None,
    out: Path,
    actors: int,
    learners: int,
    config_file: Path | None = None,
    overrides: list[str] | None = None,
    resume: bool = False,
) -> Config:
    """The learning run's config: the user's file and `key=value` overrides, then what `--learn` must set."""
    if actors < 1 or learners < 1:
        raise DopdError(f"--learn needs >= 1 learning actor and >= 1 learner rank (got {actors}, {learners})")
    forced = FORCED + [
        f"model.target={target}",
        f"out_dir={out}",
        f"cluster.actors={actors}",
        f"cluster.learners={learners}",
    ]
    if not resume:
        if drafter is None or not Path(drafter).is_dir():
            raise DopdError(
                f"--learn starts from a trained drafter: --drafter must be a drafter directory (got {drafter!r});"
                " train one with `dopd train` (or `make run`: runs/demo/drafter)"
            )
        forced.append(f"drafter.init={drafter}")
    return load_config(config_file, list(overrides or []) + forced)


class Learning:
    """The learning run in a background thread; `error` holds its traceback if it failed (serving goes on)."""

    def __init__(self, cfg: Config, resume: bool = False, log: Callable[[str], None] = print):
        self.cfg, self.resume, self.log = cfg, resume, log
        self.summary: dict | None = None
        self.error = ""
        self.thread = threading.Thread(target=self._run, name="dopd-learn", daemon=True)

    def _run(self) -> None:
        from dopd.train import train

        try:
            self.summary = train(self.cfg, resume=self.resume)
            self.log(
                f"dopd serve: learning finished its {self.summary['steps']} steps (policy v{self.summary['policy_version']},"
                f" drafter in {self.cfg.out_dir}/drafter); serving goes on with these weights"
            )
        except BaseException as e:  # noqa: BLE001 - whatever ends learning must not end serving
            self.error = traceback.format_exc()[-3000:]
            self.log(
                f"dopd serve: learning stopped ({type(e).__name__}: {e}); serving goes on. Resume it with --resume"
            )

    def start(self) -> Learning:
        self.thread.start()
        return self

    def alive(self) -> bool:
        return self.thread.is_alive()


def serve_and_learn(opts, cfg: Config, api_key: str | None, resume: bool = False, log=print) -> tuple[str, Learning]:
    """Start Ray for both halves, the Serve app wired to the feed, then the learning thread; returns (url, learning).

    Ray is started from the learning config (its actors' and learners' resources), plus the replicas' CPUs."""
    from dopd.connection import connect
    from dopd.serve import start, wait_running
    from dopd.traffic import FEED_NAME, feed_actor

    need = replace(cfg.cluster, actors=cfg.cluster.actors + opts.replicas)
    connect(replace(cfg, cluster=need))
    feed_actor(cfg.rollout.traffic_buffer)  # before the replicas: their first offers are not lost
    url = start(replace(opts, feed_name=FEED_NAME, feed_namespace="dopd"), api_key)
    # the learning run plans over the CPUs the replicas leave free (dopd/driver.py): on a 2-core machine a replica
    # holds 1 and the actor and learner share the other; planned before the replicas were placed it asked for both
    # and could not be placed ("the cluster cannot place 1 actors and 1 learners")
    wait_running()
    return url, Learning(cfg, resume=resume, log=log).start()
