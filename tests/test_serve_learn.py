"""`dopd serve --learn` end to end on the tiny target (fp32): clients are answered losslessly while the drafter
learns from their requests, the learned weights reach the replicas, and nothing is trained twice."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request

import pytest

from dopd.common.errors import DopdError
from dopd.common.specdec import DecodeSettings, SpecEngine

MODEL = "tiny-random-llama"
TEXTS = ["hi", "write a function that sums a list", "2+2=?", "tell me a story", "ok", "why", "abc", "xyz"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_learn_needs_a_trained_drafter_directory(tmp_path):
    from dopd.serve_learn import learn_config

    with pytest.raises(DopdError, match="--drafter must be a drafter directory"):
        learn_config(MODEL, "init-eagle3", tmp_path / "run", 1, 1)
    with pytest.raises(DopdError, match=">= 1 learning actor"):
        learn_config(MODEL, str(tmp_path), tmp_path / "run", 0, 1)


@pytest.mark.ray
@pytest.mark.heavy
def test_serve_learn_answers_losslessly_while_the_drafter_learns(
    ray_session, tiny, trained_tiny_drafter, tmp_path, monkeypatch
):
    """... and a real Prometheus scraping the server and the learning job sees data in every serving panel."""
    import openai

    from dopd import prometheus
    from dopd import serve as dserve
    from dopd.dashboards.check import missing_panels, missing_variables
    from dopd.dashboards.queries import HERE
    from dopd.paths import prom_targets_dir
    from dopd.serve_learn import learn_config, serve_and_learn
    from dopd.traffic import FEED_NAME

    ray = ray_session
    monkeypatch.setenv("DOPD_HOME", str(tmp_path / "home"))
    prom_cfg = prometheus.write_config(
        tmp_path / "prom" / "prometheus.yml", scrape_interval="1s", targets_dir=prom_targets_dir(),
        ray_sd_file=tmp_path / "no-ray" / "sd.json",
    )  # fmt: skip
    prom_port = free_port()
    prom = prometheus.start(prom_cfg, tmp_path / "prom" / "data", host="127.0.0.1", port=prom_port)
    d = tmp_path / "drafter"
    trained_tiny_drafter.save_pretrained(d)
    cfg = learn_config(MODEL, str(d), tmp_path / "run", actors=1, learners=1, overrides=[
        "data.prompts=champ-problems", "data.num_eval=4", "rollout.batch_size=4", "rollout.max_new_tokens=16",
        "learner.micro_batch_size=2", "learner.refresh_every=1", "learner.steps=3", "learner.lr=3e-3",
        "eval.num_prompts=4", "eval.max_new_tokens=12", "learner.eval_every=100", "learner.checkpoint_every=2",
        "metrics.port=0", "metrics.linger_s=10", "cluster.actor_num_cpus=0.5", "learner.zero_stage=2",
    ])  # fmt: skip
    opts = dserve.ServeOptions(
        target=MODEL, drafter=str(d), port=free_port(), block_size=3, batch_size=4, max_tokens=32,
        replica_num_cpus=0.5,
    )  # fmt: skip
    url, learning = serve_and_learn(opts, cfg, None, log=lambda *a: None)
    try:
        _wait_healthy(url)
        prompts, want = _prompts_and_plain_answers(tiny)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused-on-loopback", max_retries=0, timeout=300)
        answers: list[tuple[int, str]] = []
        errors: list[str] = []

        def ask(i: int) -> None:
            try:
                r = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=24, temperature=0)
                answers.append((i, r.choices[0].text))
            except Exception as e:  # noqa: BLE001 - reported by the assert below
                errors.append(repr(e))

        deadline = time.time() + 600
        rounds = 0
        while learning.alive() and time.time() < deadline:  # traffic until the learner has taken its 3 steps
            threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            rounds += 1
        learning.thread.join(timeout=120)
        assert not learning.alive() and learning.error == "", learning.error
        assert not errors, errors[:3]
        # lossless while learning: every answer is plain target decoding, whatever weights the drafter had
        for i, text in answers:
            assert text == want[i], (i, rounds)
        s = learning.summary
        assert s["steps"] == 3 and s["records_trained_twice"] == 0 and s["records_consumed"] == 3 * 2
        assert s["traffic"]["taken"] >= 6 and s["traffic"]["offered"] <= len(answers)
        # the replicas follow the learner: the final published version reaches them through the feed
        deadline = time.time() + 60
        while (info := dserve.handle().info.remote().result())["policy_version"] < s["policy_version"]:
            assert time.time() < deadline, info
            time.sleep(0.2)
        trained = [json.loads(x) for x in open(tmp_path / "run" / "opd_sequences.jsonl")]
        assert len(trained) == 6 and all("/" in t["prompt_id"] for t in trained)
        assert (tmp_path / "run" / "drafter" / "model.safetensors").is_file()  # `dopd export` reads this
        # the serving dashboard, while both were up (late in the 10 s linger, as in tests/test_prometheus_e2e.py:
        # the learning job then unregisters its target; a new target has two scrapes only seconds after it appears)
        at = (tmp_path / "run" / "summary.json").stat().st_mtime + 8.0
        missing = missing_panels(
            f"http://127.0.0.1:{prom_port}", HERE, rate_interval="1m", at=at, files=["serving.json"]
        )
        assert missing == [], missing
        assert missing_variables(f"http://127.0.0.1:{prom_port}", HERE, files=["serving.json"]) == []
    finally:
        prometheus.stop(prom)
        dserve.stop()
        try:
            ray.kill(ray.get_actor(FEED_NAME, namespace="dopd"))
        except ValueError:
            pass


def _prompts_and_plain_answers(tiny) -> tuple[list[list[int]], list[str]]:
    """TEXTS as chat prompts, and the tiny target's plain greedy answers to them (24 tokens): what a lossless server
    must answer whatever weights its drafter has."""
    prompts = [
        list(tiny.tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False))
        for t in TEXTS
    ]  # fmt: skip
    refs, _ = SpecEngine(tiny).generate(prompts, DecodeSettings(block_size=0, max_new_tokens=24, batch_size=8))
    return prompts, [tiny.tokenizer.decode(r.output_ids, skip_special_tokens=True) for r in refs]


def _wait_healthy(url: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=5).status == 200:
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} never became healthy")


def _learner_pids() -> list[int]:
    """The live learner ranks' processes (Ray titles an actor's process `ray::<class>`; this test's Ray has no
    dashboard, so the state API is not there to ask)."""
    from pathlib import Path

    pids = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and (p / "cmdline").read_bytes().startswith(b"ray::LearnerActor"):
                pids.append(int(p.name))
        except OSError:
            continue
    return pids


@pytest.mark.ray
@pytest.mark.heavy
def test_a_learner_killed_under_serve_learn_stops_learning_not_serving_and_resumes(
    ray_session, tiny, trained_tiny_drafter, tmp_path
):
    """SIGKILL the learner rank mid-run: the server keeps answering (losslessly), learning stops with a message
    naming --resume, and resuming the learning run from its checkpoint while serving reaches the planned step with
    nothing trained twice."""
    import os
    import signal

    import openai

    from dopd import checkpoint
    from dopd import serve as dserve
    from dopd.serve_learn import Learning, learn_config, serve_and_learn
    from dopd.traffic import FEED_NAME

    ray = ray_session
    d = tmp_path / "drafter"
    trained_tiny_drafter.save_pretrained(d)
    overrides = [
        "data.prompts=champ-problems", "data.num_eval=4", "rollout.batch_size=2", "rollout.max_new_tokens=16",
        "learner.micro_batch_size=2", "learner.refresh_every=1", "learner.steps=4", "learner.lr=3e-3",
        "eval.num_prompts=2", "eval.max_new_tokens=8", "learner.eval_every=100", "learner.checkpoint_every=1",
        "metrics.port=0", "cluster.actor_num_cpus=0.5",
    ]  # fmt: skip
    run = tmp_path / "run"
    cfg = learn_config(MODEL, str(d), run, actors=1, learners=1, overrides=overrides)
    opts = dserve.ServeOptions(
        target=MODEL, drafter=str(d), port=free_port(), block_size=3, batch_size=4, max_tokens=32,
        replica_num_cpus=0.5,
    )  # fmt: skip
    earlier = set(_learner_pids())  # an earlier test's learner may still be exiting: not this job's
    url, learning = serve_and_learn(opts, cfg, None, log=lambda *a: None)
    try:
        _wait_healthy(url)
        prompts, want = _prompts_and_plain_answers(tiny)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused-on-loopback", max_retries=0, timeout=300)

        def ask(i: int) -> str:
            return (
                client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=24, temperature=0).choices[0].text
            )

        def saved_step() -> int:
            try:
                return checkpoint.find(run, log=lambda *a: None).state()["run"]["step"]
            except Exception:  # noqa: BLE001 - no checkpoint yet
                return 0

        # traffic, two requests at a time, until the learner has checkpointed a step; then it starves for records
        deadline = time.time() + 300
        i = 0
        while saved_step() < 1:
            assert time.time() < deadline and learning.alive(), learning.error
            assert ask(i % len(prompts)) == want[i % len(prompts)]
            i += 1
        (pid,) = set(_learner_pids()) - earlier
        os.kill(pid, signal.SIGKILL)
        learning.thread.join(timeout=120)
        assert not learning.alive()
        assert "a learner rank failed" in learning.error and "--resume" in learning.error, learning.error
        # serving goes on, exactly as before, with no learner
        for k in range(len(prompts)):
            assert ask(k) == want[k], k
        # resume the learning run beside the live server: it continues from the checkpoint to the planned step
        at = saved_step()
        again = Learning(
            learn_config(MODEL, None, run, 1, 1, overrides=overrides, resume=True), resume=True, log=lambda *a: None
        )
        again.start()
        deadline = time.time() + 300
        while again.alive():
            assert time.time() < deadline
            assert ask(i % len(prompts)) == want[i % len(prompts)]
            i += 1
        assert again.error == "", again.error
        s = again.summary
        assert s["steps"] == 4 and s["resumes"] == 1 and s["records_trained_twice"] == 0, s
        assert at >= 1 and (run / "drafter" / "model.safetensors").is_file()
    finally:
        dserve.stop()
        try:
            ray.kill(ray.get_actor(FEED_NAME, namespace="dopd"))
        except ValueError:
            pass


@pytest.mark.parametrize(
    "args, words",
    [
        (["--target", MODEL, "learner.steps=3"], "need --learn"),
        (["--target", MODEL, "learner.steps"], "overrides look like section.key=value"),
        (["--target", MODEL, "--drafter", "init-eagle3", "--learn"], "--drafter must be a drafter directory"),
    ],
)
def test_serve_cli_refuses_a_learning_run_it_cannot_start(args, words):
    """Each is refused before Ray or a model starts, with the flag that fixes it."""
    from typer.testing import CliRunner

    from dopd.cli import app

    r = CliRunner().invoke(app, ["serve", *args])
    assert r.exit_code != 0 and words in r.output, r.output


@pytest.mark.ray
def test_a_learning_run_plans_over_the_cpus_the_replicas_left_free(ray_session):
    """`dopd serve --learn` on a 2-core machine: a replica holds 1 CPU; a learning plan over Ray's total asked for
    both cores for its actor and learner and could not be placed. The plan of a run joining this process's Ray
    counts only the free CPUs, and shares them."""
    from dopd.common.load import load_config
    from dopd.plan import Machine, make_plan

    ray = ray_session
    total = Machine.from_ray().cpus

    @ray.remote(num_cpus=total - 1)
    class Holder:  # a stand-in for the Serve replicas
        def ready(self) -> bool:
            return True

    h = Holder.remote()
    try:
        ray.get(h.ready.remote(), timeout=60)
        free = Machine.from_ray(free_cpus=True)
        assert free.cpus == 1 and Machine.from_ray().cpus == total
        cfg = load_config(
            None, ["model.target=tiny-random-llama", "runner=ray", "cluster.actors=1", "cluster.learners=1"]
        )
        plan = make_plan(cfg, free)
        assert plan.oversubscribed and plan.actor_cpus + plan.learner_cpus <= 1.0
    finally:
        ray.kill(h)
