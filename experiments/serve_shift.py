"""`dopd-experiments serve-shift`: does `dopd serve --learn` improve a drafter on traffic it was never trained on?

The setting (issue 28, part 5): a drafter trained on maths prompts (`make run`: runs/demo/drafter, champ) is served
to users who send code prompts (humaneval), where its acceptance is low. With `--learn` the server trains the drafter
on what it serves. This experiment measures whether that helps, on code prompts the server never saw, and what it
costs on the maths the drafter was trained for (forgetting).

1. The 164 humaneval prompts are split by `data.seed`: the HELD-OUT prompts are exactly the ones `dopd eval` scores
   with `data.prompts=humaneval data.num_eval=H eval.num_prompts=H`; the TRAFFIC prompts are taken from the rest.
   Disjointness is asserted twice: against our own split and against the ids the `dopd eval` subprocess reports.
2. The base drafter is evaluated on held-out humaneval and on held-out champ (the drafter's own run's held-out split).
3. `dopd serve --drafter D --learn` runs as a subprocess on loopback; the traffic prompts are replayed through the
   `openai` client (chat completions, temperature 0, a few concurrent requests) until the learning run has taken its
   `learner.steps` steps, while /metrics is sampled into live_tau.jsonl (the live-tau curve).
4. The server is stopped and the learned drafter (`<run>/drafter`) is evaluated on the same two held-out sets.

Why per-prompt numbers: every held-out prompt is answered with the same target text before and after (greedy, exact
simulation: `dopd.common.evaluation.heldout`, the measurement `dopd eval` makes), so before/after is paired by prompt
and the prompts' shared difficulty cancels. The report gives the pooled tau (the engine's ratio estimator) with the
paired bootstrap over prompts (experiments/stats.py) and the mean of the per-prompt differences with its standard
error over prompts. It is one learning run (one seed): training noise is not measured, and the report says so.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dopd.common.errors import DopdError
from dopd.experiments.stats import SIGNIFICANT_SE, PerPrompt, contrast

TRAFFIC_SET = "humaneval"
MAX_PROMPT = 512  # every humaneval prompt fits (SmolLM2: at most 437 tokens; the default 384 would drop one)
POWER_Z = 2.8  # 1.96 + 0.84: an effect of this many SEs is found with 80% power at the two-sided 5% level


@dataclass(frozen=True)
class Sizes:
    """How much is run: the defaults are the sizes of the measured run (docs/serve/shift/), QUICK a smoke test."""

    held_out: int = 32  # held-out humaneval prompts (data.num_eval = eval.num_prompts)
    traffic: int = 48  # traffic prompts replayed through the server (from the other 164 - held_out)
    champ_prompts: int = 16  # held-out champ prompts (at most the drafter's run's data.num_eval)
    max_tokens: int = 128  # per served answer, and eval.max_new_tokens
    steps: int = 24  # learner.steps of the learning run (learner.micro_batch_size records each)
    refresh_every: int = 4  # learner.refresh_every: steps between weight publishes to the replicas
    concurrency: int = 8  # client threads replaying the traffic
    sample_every: float = 10.0  # seconds between /metrics samples
    deadline_s: float = 1500.0  # give up on the learning run after this long serving
    learn: tuple[str, ...] = ()  # extra key=value settings of the learning run (e.g. learner.opd_lr=2e-4)

    def __post_init__(self) -> None:
        bad = [f"{k}={v}" for k, v in asdict(self).items() if k != "learn" and not v > 0]
        bad += [f"--learn-set {x!r} (not key=value)" for x in self.learn if "=" not in x]
        if bad:
            raise DopdError(f"serve-shift: sizes must be > 0 and settings key=value: {', '.join(bad)}")


QUICK = Sizes(held_out=8, traffic=16, champ_prompts=4, max_tokens=32, steps=4, refresh_every=2, deadline_s=600.0)


# --- the split ----------------------------------------------------------------------------------------------------


def traffic_split(prompts: list, held_out: int, seed: int, n_traffic: int) -> tuple[list, list]:
    """(traffic prompts, held-out prompts): the held-out groups are `split_prompts`' (the split `dopd eval` scores
    with data.num_eval=held_out, data.seed=seed), the traffic the first n_traffic of the others in its seeded order."""
    from dopd.prompts import split_prompts

    if held_out < 1 or n_traffic < 1:
        raise DopdError(f"--held-out and --traffic must be >= 1 (got {held_out}, {n_traffic})")
    sp = split_prompts(prompts, held_out, seed, TRAFFIC_SET)
    if n_traffic > len(sp.train):
        raise DopdError(
            f"--traffic {n_traffic}: only {len(sp.train)} {TRAFFIC_SET} prompts are left after holding out {held_out}"
            f" (lower --traffic or --held-out; {len({p.group for p in prompts})} in all)"
        )
    traffic = sp.train[:n_traffic]
    check_disjoint([p.group for p in traffic], [p.group for p in sp.eval], "the held-out split")
    return traffic, sp.eval


def check_disjoint(traffic: list[str], scored: list[str], what: str) -> None:
    """Refuse to go on when a traffic prompt is also scored: a gain on it would be memorisation, not transfer."""
    both = sorted(set(traffic) & set(scored))
    if both:
        raise DopdError(f"{len(both)} traffic prompt(s) are also in {what}: {both[:5]}; the measurement would be void")


# --- statistics ---------------------------------------------------------------------------------------------------


def per_prompt_tau(steps, accepted) -> np.ndarray:
    """tau of each prompt: (accepted drafts + steps) / steps."""
    s, a = np.asarray(steps, dtype=np.float64), np.asarray(accepted, dtype=np.float64)
    if s.shape != a.shape or s.ndim != 1 or s.size == 0 or (s <= 0).any():
        raise ValueError(f"per-prompt steps {s.shape} and accepted {a.shape} must be equal non-empty 1-d, steps > 0")
    return (a + s) / s


def paired(before: dict, after: dict, n_boot: int = 2000, seed: int = 0) -> dict:
    """After minus before on the same prompts: pooled tau difference (paired bootstrap SE over prompts) and the mean
    per-prompt difference with its standard error over prompts (sample sd / sqrt(P))."""
    if before["prompt_ids"] != after["prompt_ids"]:
        raise ValueError("before and after must be evaluated on the same prompts, in the same order")
    tb = per_prompt_tau(before["per_prompt_steps"], before["per_prompt_accepted"])
    ta = per_prompt_tau(after["per_prompt_steps"], after["per_prompt_accepted"])
    d = ta - tb
    c = contrast(
        [PerPrompt(after["per_prompt_steps"], after["per_prompt_accepted"])],
        [PerPrompt(before["per_prompt_steps"], before["per_prompt_accepted"])],
        n_boot=n_boot,
        seed=seed,
    )
    return {
        "prompts": int(d.size),
        "pooled_before": PerPrompt(before["per_prompt_steps"], before["per_prompt_accepted"]).tau,
        "pooled_after": PerPrompt(after["per_prompt_steps"], after["per_prompt_accepted"]).tau,
        "pooled_diff": c["diff"],
        "pooled_diff_se": c["se_prompts"],  # one learning run: over prompts only
        "pooled_diff_ci95": c["ci95_prompts_bootstrap"],
        "mean_prompt_diff": float(d.mean()),
        "mean_prompt_diff_se": float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("nan"),
        "prompts_improved": int((d > 0).sum()),
        "prompts_worse": int((d < 0).sum()),
        "steps_before": int(np.sum(before["per_prompt_steps"])),
        "steps_after": int(np.sum(after["per_prompt_steps"])),
    }


def verdict(diff: float, se: float, meaningful: float) -> str:
    """positive / negative (|diff| > SIGNIFICANT_SE x SE), a powered null (the SE rules out an effect of
    `meaningful` tokens/step with 80% power), else underpowered."""
    if not np.isfinite(se) or se < 0 or meaningful <= 0:
        raise ValueError(f"verdict needs a finite SE >= 0 and meaningful > 0 (got se={se}, meaningful={meaningful})")
    if abs(diff) > SIGNIFICANT_SE * se:
        return "positive" if diff > 0 else "negative"
    return "powered null" if POWER_Z * se <= meaningful else "underpowered"


# --- evaluation ---------------------------------------------------------------------------------------------------


@dataclass
class EvalSet:
    """One held-out measurement: a config file (or none) plus overrides, used by the Python API and `dopd eval`."""

    name: str
    config: Path | None
    overrides: list[str]

    def cfg(self):
        from dopd.common.load import load_config

        return load_config(self.config, self.overrides)

    def cli_args(self) -> list[str]:
        return (["--config", str(self.config)] if self.config else []) + self.overrides


def eval_sets(drafter: Path, target: str, sz: Sizes, seed: int, dtype: str) -> list[EvalSet]:
    """Held-out humaneval (split by `seed`) and the drafter's own held-out champ (its run's config.yaml: the split it
    was trained without), both greedy, K = 4, `sz.max_tokens` answer tokens."""
    common = [f"model.target={target}", f"model.dtype={dtype}", "eval.block_size=4", "eval.temperature=0",
              f"eval.max_new_tokens={sz.max_tokens}", "eval.simulate=true"]  # fmt: skip
    he = [f"data.prompts={TRAFFIC_SET}", f"data.num_eval={sz.held_out}", f"eval.num_prompts={sz.held_out}",
          f"data.seed={seed}", f"data.max_prompt_tokens={MAX_PROMPT}"]  # fmt: skip
    run_cfg = drafter.parent / "config.yaml"
    champ = EvalSet("champ", run_cfg if run_cfg.is_file() else None, common + [f"eval.num_prompts={sz.champ_prompts}"])
    if champ.config is None:
        champ.overrides = champ.overrides + ["data.prompts=champ"]
    elif champ.cfg().data.prompts != "champ":
        raise DopdError(f"{run_cfg}: the drafter was trained on {champ.cfg().data.prompts}, not champ")
    return [EvalSet(TRAFFIC_SET, None, common + he), champ]


def heldout_eval(target, drafter_dir: Path, es: EvalSet) -> dict:
    """`dopd eval`'s measurement through the Python API, keeping the per-prompt counts its JSON leaves out."""
    from dopd.common.drafters import drafter_for_target
    from dopd.common.evaluation import eval_settings, heldout
    from dopd.prompts import heldout_examples

    cfg = es.cfg()
    ev = heldout_examples(cfg, target.tokenizer)
    n = min(cfg.eval.num_prompts, len(ev.items))
    d = drafter_for_target(str(drafter_dir), target, seed=cfg.seed)
    ids = [it[1] for it in ev.items[:n]]
    res = heldout(target, d, ids, eval_settings(cfg), simulate=True)
    res["vocab_coverage"] = vocab_coverage(target, d, ids, cfg.eval.max_new_tokens)
    res["prompt_ids"] = [p.id for p in ev.prompts[:n]]
    res["drafter"] = str(drafter_dir)
    res["set"] = es.name
    return res


def vocab_coverage(target, drafter, prompt_ids: list[list[int]], max_new_tokens: int) -> float:
    """Share of the target's answer tokens the drafter can draft at all: a reduced draft vocabulary chosen on maths
    (make run: 8192 tokens) caps what learning on code can gain, whatever the weights."""
    import torch

    from dopd.common.greedy import greedy_texts

    t2d = getattr(drafter, "t2d", None)
    if t2d is None:
        return 1.0
    ans = torch.tensor([t for x in greedy_texts(target, prompt_ids, max_new_tokens) for t in x.answer])
    return float((t2d[ans] >= 0).float().mean()) if ans.numel() else float("nan")


def cli_eval(drafter_dir: Path, es: EvalSet, out: Path, log) -> dict:
    """The same measurement by the `dopd eval` command (its JSON report): ties the numbers to the CLI."""
    cmd = [sys.executable, "-m", "dopd.cli", "eval", "--drafter", str(drafter_dir), *es.cli_args(), "--json", str(out),
           "--no-baseline", "--threads", "2"]  # fmt: skip
    log(f"serve-shift: {' '.join(cmd[2:])}")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise DopdError(f"dopd eval failed ({r.returncode}): {(r.stderr or r.stdout)[-2000:]}")
    return json.loads(out.read_text())


# --- the server ---------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def learn_overrides(sz: Sizes, seed: int, dtype: str) -> list[str]:
    """The learning run's settings: the default recipe and learning rate of the drafter kind, sized to the traffic;
    its own held-out evaluation is on a few held-out humaneval prompts (a cross-check, not the measurement)."""
    return [
        f"model.dtype={dtype}", f"learner.steps={sz.steps}", f"learner.refresh_every={sz.refresh_every}",
        "learner.micro_batch_size=2", "learner.eval_every=1000000", "learner.checkpoint_every=1000000",
        f"rollout.max_new_tokens={sz.max_tokens}", f"data.prompts={TRAFFIC_SET}", f"data.num_eval={sz.held_out}",
        f"data.seed={seed}", f"data.max_prompt_tokens={MAX_PROMPT}", f"eval.num_prompts={min(8, sz.held_out)}",
        f"eval.max_new_tokens={sz.max_tokens}", "eval.block_size=4", f"seed={seed}", "metrics.port=0", *sz.learn,
    ]  # fmt: skip


def serve_command(drafter: Path, port: int, run_dir: Path, sz: Sizes, seed: int, dtype: str) -> list[str]:
    return [
        sys.executable, "-m", "dopd.cli", "serve", "--drafter", str(drafter), "--learn", "--host", "127.0.0.1",
        "--port", str(port), "--out", str(run_dir), "--learners", "1", "--learn-actors", "1", "--block-size", "4",
        "--batch-size", str(max(4, sz.concurrency)), "--max-tokens", str(max(256, sz.max_tokens)), "--dtype", dtype,
        *learn_overrides(sz, seed, dtype),
    ]  # fmt: skip


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Server:
    """`dopd serve --learn` as a subprocess in its own session (its Ray processes with it), logging to a file."""

    def __init__(self, cmd: list[str], log_path: Path, url: str):
        self.cmd, self.log_path, self.url = cmd, log_path, url
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        self.log_file = open(self.log_path, "w")
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        # SIGINT back to its default: started from a background shell it is ignored, and the CLI would never see
        # the Ctrl-C that stops it cleanly
        self.proc = subprocess.Popen(self.cmd, stdout=self.log_file, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, preexec_fn=_default_sigint)  # fmt: skip
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_health(self, timeout: float) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise DopdError(
                    f"dopd serve exited ({self.proc.returncode}) before answering: {self.log_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                    if r.status == 200:
                        return json.loads(r.read())
            except OSError:
                pass
            time.sleep(1.0)
        raise DopdError(f"dopd serve did not answer /health in {timeout:.0f} s: {self.log_text()[-3000:]}")

    def stop(self, grace: float = 60.0) -> int | None:
        """SIGINT (the CLI stops Serve and exits), then SIGTERM, then SIGKILL of its session (our own children)."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 30.0)):
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(timeout=30)


def parse_metrics(text: str) -> dict:
    """The live numbers of a /metrics answer, summed over replicas (tau and version: the mean / the oldest)."""
    from prometheus_client.parser import text_string_to_metric_families

    want = {
        "dopd_serve_tau": "tau_window",
        "dopd_serve_policy_version": "policy_version",
        "dopd_serve_verification_steps": "steps",
        "dopd_serve_accepted_drafts": "accepted",
        "dopd_serve_generated_tokens": "tokens",
    }
    vals: dict[str, list[float]] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name in want:
            for s in fam.samples:
                if s.name.endswith("_created"):
                    continue
                vals.setdefault(want[fam.name], []).append(float(s.value))
    out: dict = {}
    for k, v in vals.items():
        out[k] = min(v) if k == "policy_version" else float(np.mean(v)) if k == "tau_window" else float(sum(v))
    return out


class MetricsSampler:
    """/metrics every `every` seconds into a JSONL file; each row also gets the tau of the interval since the last
    row (from the step and accepted-draft counters) and the learning run's latest step."""

    def __init__(self, url: str, path: Path, every: float, run_dir: Path):
        self.url, self.path, self.every, self.run_dir = url, path, every, run_dir
        self.stop_flag = threading.Event()
        self.rows: list[dict] = []
        self.t0 = time.time()
        self.thread = threading.Thread(target=self._loop, name="serve-shift-metrics", daemon=True)

    def _learner_step(self) -> int | None:
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return None
        last = None
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written
            if row.get("event") == "step":
                last = row["step"]
        return last

    def sample(self) -> dict | None:
        try:
            with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as r:
                m = parse_metrics(r.read().decode())
        except OSError:
            return None
        now = time.time()
        row = {"t_s": round(now - self.t0, 2), "time": now, **m, "learner_step": self._learner_step()}
        prev = self.rows[-1] if self.rows else {"steps": 0.0, "accepted": 0.0}
        ds = m.get("steps", 0.0) - prev.get("steps", 0.0)
        row["tau_interval"] = (ds + m.get("accepted", 0.0) - prev.get("accepted", 0.0)) / ds if ds > 0 else None
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    def _loop(self) -> None:
        while not self.stop_flag.wait(self.every):
            self.sample()

    def start(self) -> MetricsSampler:
        self.path.write_text("")
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_flag.set()
        self.thread.join(timeout=30)
        self.sample()


# --- traffic ------------------------------------------------------------------------------------------------------


@dataclass
class Served:
    prompt_id: str
    epoch: int
    text: str
    completion_tokens: int
    finish: str
    seconds: float
    finished_at: float  # unix time: lines the answer up with the live curve (which drafter weights served it)


@dataclass
class Replay:
    """Replays the traffic prompts through the `openai` client, epoch after epoch, until `done()` says stop."""

    url: str
    model: str
    prompts: list
    max_tokens: int
    concurrency: int
    served: list[Served] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def _ask(self, client, p, epoch: int, done) -> None:
        if done():
            return
        t0 = time.perf_counter()
        try:
            r = client.chat.completions.create(model=self.model, messages=p.as_messages(), max_tokens=self.max_tokens,
                                               temperature=0)  # fmt: skip
            c = r.choices[0]
            self.served.append(Served(p.id, epoch, c.message.content or "", r.usage.completion_tokens,
                                      c.finish_reason, time.perf_counter() - t0, time.time()))  # fmt: skip
        except Exception as e:  # noqa: BLE001 - counted and reported; the replay goes on
            self.errors.append(f"{p.id}: {type(e).__name__}: {e}"[:500])

    def run(self, done, deadline: float, log) -> int:
        """Epochs over the traffic until done() or the deadline; returns the epochs started."""
        import openai

        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused-on-loopback", max_retries=2, timeout=900)
        epoch = 0
        with ThreadPoolExecutor(self.concurrency) as pool:
            while not done() and time.time() < deadline:
                list(pool.map(lambda p, e=epoch: self._ask(client, p, e, done), self.prompts))
                epoch += 1
                log(f"serve-shift: traffic epoch {epoch} done ({len(self.served)} answers, {len(self.errors)} errors)")
                if len(self.errors) > len(self.prompts) // 2:
                    raise DopdError(f"most requests failed: {self.errors[:3]}")
        return epoch


def lossless_check(target, served: list[Served], prompts: dict, n: int, max_tokens: int) -> dict:
    """Served greedy answers (n, spread over the run) against plain target decoding (no drafter) of the same
    chat-templated prompts: equal text and equal token counts (the server reports usage, not ids)."""
    from dopd.common.specdec import DecodeSettings, SpecEngine

    picks: list[Served] = []  # spread over the whole run: answers served under different drafter weights
    for i in np.linspace(0, len(served) - 1, min(n, len(served))).round().astype(int) if served else []:
        if served[i].prompt_id not in {p.prompt_id for p in picks}:
            picks.append(served[i])
    if not picks:
        raise DopdError("no served answer to check")
    tok = target.tokenizer
    ids = [list(tok.apply_chat_template(prompts[s.prompt_id].as_messages(), add_generation_prompt=True,
                                        tokenize=True, return_dict=False)) for s in picks]  # fmt: skip
    refs, _ = SpecEngine(target, None).generate(ids, DecodeSettings(block_size=0, max_new_tokens=max_tokens,
                                                                   batch_size=len(ids)))  # fmt: skip
    rows = []
    for s, r in zip(picks, refs):
        ref = tok.decode(r.output_ids, skip_special_tokens=True)
        rows.append({"prompt_id": s.prompt_id, "epoch": s.epoch, "finished_at": s.finished_at, "text_equal": ref == s.text,
                     "tokens_served": s.completion_tokens, "tokens_plain": len(r.output_ids)})  # fmt: skip
    ok = all(x["text_equal"] and x["tokens_served"] == x["tokens_plain"] for x in rows)
    return {"checked": len(rows), "identical": ok, "rows": rows}


# --- the run ------------------------------------------------------------------------------------------------------


def learning_done(run_dir: Path, log_text: str) -> str | None:
    """'finished' once the run wrote drafter/ and summary.json, 'failed' when the serve log says learning stopped."""
    if (run_dir / "summary.json").is_file() and (run_dir / "drafter" / "model.safetensors").is_file():
        return "finished"
    if "dopd serve: learning stopped" in log_text:
        return "failed"
    return None


def machine() -> str:
    """The CPU model and core count (lscpu's model name), for the report's first lines."""
    name = "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), name)
    except OSError:
        pass
    return f"{name}, {len(os.sched_getaffinity(0))} cores, CPU only"


def _evaluate_all(target, drafter: Path, sets: list[EvalSet], out: Path, tag: str, log) -> dict:
    """Both held-out sets through the Python API and `dopd eval`; refuse when the two disagree."""
    res = {}
    for es in sets:
        r = heldout_eval(target, drafter, es)
        cli = cli_eval(drafter, es, out / f"eval_{tag}_{es.name}.json", log)
        if cli["prompt_ids"] != r["prompt_ids"]:
            raise DopdError(
                f"dopd eval scored other prompts than the Python API on {es.name}/{tag}: {len(cli['prompt_ids'])} vs"
                f" {len(r['prompt_ids'])}, first {cli['prompt_ids'][:3]} vs {r['prompt_ids'][:3]}"
            )
        r["cli_tau"] = cli["tau"]  # the report flags a difference (same texts, same drafter: expected equal)
        res[es.name] = r
        log(f"serve-shift: {tag} drafter on held-out {es.name}: tau {r['tau']:.4f} over {r['steps']} steps")
    return res


def _serve_and_learn(drafter, traffic, out, sz, seed, dtype, model, log) -> dict:
    """Start the server, replay the traffic while sampling /metrics, stop the server once learning is done."""
    run_dir, port = out / "run", free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = serve_command(drafter, port, run_dir, sz, seed, dtype)
    shown = ["dopd", *cmd[3:]]  # what a user types: `dopd serve ...`
    (out / "serve_command.txt").write_text(" ".join(shown) + "\n")
    srv = Server(cmd, out / "serve.log", url).start()
    t0 = time.time()
    sampler = None
    try:
        health = srv.wait_health(600)
        log(f"serve-shift: server up at {url} after {time.time() - t0:.0f} s ({health.get('replica')})")
        sampler = MetricsSampler(url, out / "live_tau.jsonl", sz.sample_every, run_dir).start()
        replay = Replay(url, model, traffic, sz.max_tokens, sz.concurrency)
        state = {"done": None}

        def done() -> bool:
            state["done"] = state["done"] or learning_done(run_dir, srv.log_text())
            return state["done"] is not None

        epochs = replay.run(done, t0 + sz.deadline_s, log)
        while not done() and time.time() < t0 + sz.deadline_s:  # the last steps after the last answer
            time.sleep(2.0)
        serve_s = time.time() - t0
    finally:
        if sampler is not None:
            sampler.stop()
        code = srv.stop()
    if state["done"] != "finished":
        raise DopdError(f"the learning run did not finish ({state['done'] or 'deadline'}): {srv.log_text()[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"url": url, "serve_s": serve_s, "epochs": epochs, "served": replay.served, "errors": replay.errors,
            "live": sampler.rows, "summary": summary, "exit_code": code, "command": shown}  # fmt: skip


def serve_shift(
    out: Path, drafter: Path, sz: Sizes, seed: int, meaningful: float, log=print, command: str = ""
) -> dict:
    """The whole experiment; returns (and writes to out/results.json) what the report shows."""
    from dopd.common.drafters.base import Drafter
    from dopd.common.models import load_target
    from dopd.prompts import load_prompt_set

    t_start = time.time()
    if not (drafter / "config.json").is_file():
        raise DopdError(f"--drafter {drafter}: no drafter there (no config.json); `make run` writes runs/demo/drafter")
    target_name = Drafter.read_spec(str(drafter)).target["name"]
    out.mkdir(parents=True, exist_ok=True)
    dtype = "float32"  # what the server decodes in: the held-out texts are the served ones
    traffic, _ = traffic_split(load_prompt_set(TRAFFIC_SET), sz.held_out, seed, sz.traffic)
    sets = eval_sets(drafter, target_name, sz, seed, dtype)
    target = load_target(target_name, dtype=dtype)
    before = _evaluate_all(target, drafter, sets, out, "base", log)
    check_disjoint([p.id for p in traffic], before[TRAFFIC_SET]["prompt_ids"], "the prompts `dopd eval` scores")
    sv = _serve_and_learn(drafter, traffic, out, sz, seed, dtype, target_name, log)
    learned = out / "run" / "drafter"
    after = _evaluate_all(target, learned, sets, out, "learned", log)
    lossless = lossless_check(target, sv["served"], {p.id: p for p in traffic}, 6, sz.max_tokens)
    results = {
        "machine": machine(), "torch_threads": __import__("torch").get_num_threads(), "target": target_name,
        "dtype": dtype, "drafter": str(drafter), "sizes": asdict(sz), "seed": seed, "meaningful": meaningful,
        "traffic_ids": [p.id for p in traffic], "before": _strip(before), "after": _strip(after),
        "paired": {k: paired(before[k], after[k]) for k in before},
        "lossless": lossless, "serve": {k: v for k, v in sv.items() if k not in ("served", "live")}, "live": sv["live"],
        "served": [asdict(s) for s in sv["served"]], "wall_s": time.time() - t_start, "command": command,
    }  # fmt: skip
    h = results["paired"][TRAFFIC_SET]
    results["verdict"] = verdict(h["pooled_diff"], h["pooled_diff_se"], meaningful)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "report.md").write_text(render(results))
    return results


def _strip(res: dict) -> dict:
    keep = ("tau", "cli_tau", "vocab_coverage", "se", "steps", "alpha", "prompt_ids", "per_prompt_steps", "per_prompt_accepted",
            "drafter", "set", "simulated")  # fmt: skip
    return {name: {k: r[k] for k in keep if k in r} for name, r in res.items()}


# --- the report ---------------------------------------------------------------------------------------------------


def render(r: dict) -> str:
    """report.md from results.json: verdict first, the machine, the table, the live curve, the lossless check."""
    he, ch = r["paired"][TRAFFIC_SET], r["paired"]["champ"]
    sz, sv, s = r["sizes"], r["serve"], r["serve"]["summary"]
    v = r["verdict"]
    lines = [
        f"**Result: {v}** (held-out humaneval tau {he['pooled_before']:.3f} -> {he['pooled_after']:.3f}, "
        f"difference {he['pooled_diff']:+.3f} +- {he['pooled_diff_se']:.3f} SE over {he['prompts']} prompts; "
        f"'{v}' by the rule below)",
        "",
        f"Machine: {r['machine']}; torch {r['torch_threads']} threads in the evaluating process. "
        f"Target {r['target']} ({r['dtype']}), drafter {r['drafter']}.",
        "",
        "# `dopd serve --learn` on shifted traffic: maths drafter, code users",
        "",
        f"Traffic: {len(r['traffic_ids'])} humaneval prompts replayed through the `openai` client in {sv['epochs']}"
        f" epoch(s) (the last cut short once learning finished; {sz['concurrency']} concurrent chat completions,"
        f" T = 0, max_tokens {sz['max_tokens']}): {len(r['served'])} answers, {len(sv['errors'])} errors."
        + (f" Learning-run settings added: {' '.join(sz['learn'])}." if sz.get("learn") else "")
        + f" Learning: {s['steps']} learner steps (policy v{s['policy_version']}),"
        f" {s.get('records_consumed', '?')} records, {sv['serve_s']:.0f} s serving;"
        f" whole experiment {r['wall_s'] / 60:.1f} min. Seeds: split data.seed={r['seed']}, learning run seed={r['seed']}.",
        "",
        "Held-out sets are disjoint from the traffic (asserted against the ids `dopd eval` reported). tau is exact"
        " greedy acceptance (tokens per verification step, K = 4) on the target's own answers; before and after"
        " score the same answers, so the difference is paired by prompt.",
        "",
        "| held-out set | prompts | tau before | tau after | diff (pooled) +- SE | mean per-prompt diff +- SE |"
        " prompts better / worse | verification steps before / after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, p in ((TRAFFIC_SET, he), ("champ", ch)):
        lines.append(
            f"| {name} | {p['prompts']} | {p['pooled_before']:.3f} | {p['pooled_after']:.3f} |"
            f" {p['pooled_diff']:+.3f} +- {p['pooled_diff_se']:.3f} | {p['mean_prompt_diff']:+.3f} +-"
            f" {p['mean_prompt_diff_se']:.3f} | {p['prompts_improved']} / {p['prompts_worse']} |"
            f" {p['steps_before']} / {p['steps_after']} |"
        )
    lines += [
        "",
        "SEs are over prompts only (pooled: paired bootstrap of the ratio estimator, 2000 resamples; per-prompt: sample"
        " sd / sqrt(P)); this is one learning run, so training noise (another seed, another traffic order) is not"
        f" measured. Rule: positive / negative when |diff| > {SIGNIFICANT_SE:g} SE; a powered null when"
        f" {POWER_Z} SE <= {r['meaningful']} tokens/step (80% power for that effect); otherwise underpowered.",
        "",
        "Draft vocabulary: the share of the target's held-out answer tokens the drafter can draft at all is "
        + ", ".join(f"{n} {r['before'][n].get('vocab_coverage', float('nan')):.1%}" for n in r["before"])
        + " (the reduced vocabulary is fixed when learning starts from a trained drafter).",
        "",
        "`dopd eval --json` (the CLI, same settings) pooled tau: "
        + ", ".join(f"{w} {n} {r[w][n]['cli_tau']:.4f} ({_agree(r[w][n])})" for w in ("before", "after") for n in r[w]),
        "",
        f"Lossless: {r['lossless']['checked']} served answers vs plain target greedy decoding: "
        + ("identical text and token counts" if r["lossless"]["identical"] else "MISMATCH (see results.json)"),
        "",
        "## Live tau (/metrics every ~10 s: live_tau.jsonl)",
        "",
        "Measured on the traffic itself, not on held-out prompts: in epoch 1 each prompt is new to the drafter, from"
        " epoch 2 on the server answers prompts the drafter has already been trained on (an upper bound, not"
        " transfer). The held-out table above is the measurement.",
        "",
        "| t (s) | traffic epoch | learner step | policy version | tau (last 512 row-steps) | tau (interval) |",
        "|---|---|---|---|---|---|",
    ]
    for row in _live_rows(r.get("live", [])):
        ti = "" if row.get("tau_interval") is None else f"{row['tau_interval']:.3f}"
        lines.append(f"| {row['t_s']:.0f} | {_epoch_at(r.get('served', []), row.get('time'))} |"
                     f" {row.get('learner_step')} | {row.get('policy_version', 0):.0f} |"
                     f" {row.get('tau_window', float('nan')):.3f} | {ti} |")  # fmt: skip
    lines += [
        "",
        f"Command: `{r.get('command', '')}`",
        "",
        "Serve half (what it ran): `" + " ".join(sv["command"]) + "`",
        "",
    ]
    return "\n".join(lines)


def _epoch_at(served: list[dict], t: float | None) -> str:
    """The newest traffic epoch (1-based) the server had started answering by time t (its requests' start:
    finished_at - seconds); '' for a row without a time."""
    began = [a["epoch"] for a in served if t is not None and a.get("finished_at", float("inf")) - a["seconds"] <= t]
    return str(max(began) + 1) if began else ""


def render_report(d: Path) -> None:
    """Re-render report.md from a results.json (`dopd-experiments render DIR`)."""
    (d / "report.md").write_text(render(json.loads((d / "results.json").read_text())))


def _agree(e: dict) -> str:
    return "equal" if abs(e["cli_tau"] - e["tau"]) <= 1e-9 else f"DIFFERS from {e['tau']:.4f}"


def _live_rows(rows: list[dict], most: int = 30) -> list[dict]:
    """At most `most` evenly spaced rows of the live curve (the last always)."""
    if len(rows) <= most:
        return rows
    idx = sorted(set(np.linspace(0, len(rows) - 1, most).round().astype(int).tolist()))
    return [rows[i] for i in idx]


def main_serve_shift(out: Path, drafter: Path, quick: bool, seed: int, meaningful: float, report: Path | None,
                     command: str = "", **sizes) -> dict:  # fmt: skip
    """The CLI's entry: the sizes (QUICK or the defaults, then the options given), the run, the report copy."""
    base = QUICK if quick else Sizes()
    given = {k: (tuple(v) if k == "learn" else v) for k, v in sizes.items() if v is not None}
    sz = Sizes(**{**asdict(base), **given})
    res = serve_shift(out, drafter, sz, seed, meaningful, command=command)
    if report is not None:
        report.mkdir(parents=True, exist_ok=True)
        for name in ("report.md", "results.json", "live_tau.jsonl", "serve_command.txt"):
            (report / name).write_bytes((out / name).read_bytes())
    return res
