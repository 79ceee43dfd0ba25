"""`dopd serve` end to end: the `openai` client against a live Ray Serve app on the tiny target (fp32).

One server for the module (starting Serve and a replica takes seconds): completions, chat, streaming, usage, stop
strings; bad requests answered with a 4xx naming the problem while the replica lives on; greedy answers equal plain
target decoding while the drafter's weights are swapped under load; a killed replica restarted by Serve.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from dopd.common.config import DrafterConfig
from dopd.common.drafters import build_drafter
from dopd.common.errors import DopdError
from dopd.common.specdec import DecodeSettings, SpecEngine

pytestmark = pytest.mark.ray

MODEL = "tiny-random-llama"


def http(method: str, url: str, body: bytes | None = None, timeout: float = 60) -> tuple[int, str]:
    """(status, text) of one plain HTTP request (the stdlib: the bad requests are sent as raw bytes)."""
    req = urllib.request.Request(url, data=body, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eagle(tiny, seed):
    return build_drafter(
        DrafterConfig(kind="eagle3"), tiny.info, tiny.model.config, tiny.embed_tokens.weight, tiny.lm_head.weight,
        seed=seed,
    )  # fmt: skip


@pytest.fixture(scope="module")
def server(ray_session, tiny, tmp_path_factory):
    from dopd import serve as dserve
    from dopd.traffic import FEED_NAME, feed_actor

    # the learning side's feed: replicas offer it finished requests and poll it for weights (kept referenced until
    # teardown: a non-detached actor dies with its last handle)
    feed = feed_actor(64)
    d = tmp_path_factory.mktemp("serve_drafter")
    eagle(tiny, 0).save_pretrained(d)
    opts = dserve.ServeOptions(
        target=MODEL, drafter=str(d), port=free_port(), block_size=3, batch_size=4, max_tokens=64,
        max_prompt_tokens=512, max_body_bytes=200_000, max_concurrent=16, replica_num_cpus=1,
        feed_name=FEED_NAME,
    )  # fmt: skip
    url = dserve.start(opts)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if http("GET", f"{url}/health", timeout=5)[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.5)
    yield url
    dserve.stop()
    del feed


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused-on-loopback", max_retries=0, timeout=120)


def plain_ids(tiny, ids, n):
    res, _ = SpecEngine(tiny).generate([ids], DecodeSettings(block_size=0, max_new_tokens=n, batch_size=1))
    return res[0].output_ids


def text_of(tiny, ids):
    return tiny.tokenizer.decode(ids, skip_special_tokens=True)


def chat_ids(tiny, text):
    return list(
        tiny.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )


def test_models_completions_chat_and_usage(tiny, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    prompt = "the quick brown fox"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    ids = list(tiny.tokenizer.encode(prompt, add_special_tokens=False))
    ref = plain_ids(tiny, ids, 12)
    assert r.choices[0].text == text_of(tiny, ref)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(ref))
    assert r.usage.total_tokens == len(ids) + len(ref)
    assert r.choices[0].finish_reason == ("length" if len(ref) == 12 else "stop")

    c = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "write a function"}], max_tokens=10, temperature=0
    )
    cids = chat_ids(tiny, "write a function")
    cref = plain_ids(tiny, cids, 10)
    assert c.choices[0].message.role == "assistant"
    assert c.choices[0].message.content == text_of(tiny, cref)
    assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (len(cids), len(cref))


def test_streaming_equals_the_whole_answer(tiny, client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "tell me a story"}], max_tokens=20, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) > 1  # really incremental
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finish and finish[-1] in ("stop", "length")
    s = list(client.completions.create(model=MODEL, prompt="hello world", max_tokens=8, temperature=0, stream=True))
    whole = client.completions.create(model=MODEL, prompt="hello world", max_tokens=8, temperature=0)
    assert "".join(ch.choices[0].text for ch in s) == whole.choices[0].text


def test_stop_string_cuts_the_answer(tiny, client):
    prompt = "once upon a time"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0).choices[0].text
    assert len(full) > 6
    stop = full[4:6]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stop=stop, stream=True
    )
    assert "".join(ch.choices[0].text for ch in streamed) == full[: full.find(stop)]


def test_sampling_with_top_p_answers(client):
    r = client.completions.create(model=MODEL, prompt="pick a word", max_tokens=10, temperature=0.8, top_p=0.9)
    assert r.usage.completion_tokens >= 1 and r.choices[0].finish_reason in ("stop", "length")


def _info(server):
    return json.loads(http("GET", f"{server}/health")[1])


@pytest.mark.parametrize(
    "body,status,code,words",
    [
        (b'{"model": "tiny-random-llama", "prompt": "hi', 400, "invalid_json", "not valid JSON"),
        (json.dumps({"model": "gpt-9", "prompt": "hello"}).encode(), 404, "model_not_found", "gpt-9"),
        (json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 5000}).encode(), 400, "max_tokens_limit", "limit of 64"),
        (json.dumps({"model": MODEL, "prompt": [65] * 2100, "max_tokens": 4}).encode(), 400, "context_length_exceeded", "context is 2048"),
        (json.dumps({"model": MODEL, "prompt": [65] * 600, "max_tokens": 4}).encode(), 400, "prompt_too_long", "limit of 512"),
        (json.dumps({"model": MODEL, "prompt": "x" * 250_000}).encode(), 413, "body_too_large", "limit of 200000"),
        (json.dumps({"model": MODEL, "prompt": "hello", "temperature": -1}).encode(), 400, "invalid_value", "temperature"),
    ],
)  # fmt: skip
def test_bad_requests_get_a_4xx_naming_the_problem(server, client, body, status, code, words):
    before = _info(server)["pid"]
    code_, text = http("POST", f"{server}/v1/completions", body)
    assert code_ == status, text
    err = json.loads(text)["error"]
    assert err["code"] == code and words in err["message"], err
    assert set(err) == {"message", "type", "param", "code"}
    # the replica is the same process and still answers
    ok = client.completions.create(model=MODEL, prompt="still there?", max_tokens=3, temperature=0)
    assert ok.usage.completion_tokens >= 1
    assert _info(server)["pid"] == before


def test_openai_client_raises_on_an_unknown_model(client):
    import openai

    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)


def test_non_loopback_without_a_key_is_refused(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from dopd.cli import app
    from dopd.serve import check_bind, read_api_key

    monkeypatch.delenv("DOPD_API_KEY", raising=False)
    with pytest.raises(DopdError, match="without an API key"):
        check_bind("0.0.0.0", read_api_key(None))
    check_bind("127.0.0.1", None)  # loopback needs none
    res = CliRunner().invoke(app, ["serve", "--target", MODEL, "--host", "0.0.0.0"])
    assert res.exit_code == 2 and "without an API key" in res.output, res.output
    monkeypatch.setenv("DOPD_API_KEY", "s3cret")
    check_bind("0.0.0.0", read_api_key(None))
    (tmp_path / "key").write_text("from-file\n")
    assert read_api_key(tmp_path / "key") == "from-file"
    (tmp_path / "empty").write_text("")
    with pytest.raises(DopdError, match="empty"):
        read_api_key(tmp_path / "empty")


def test_metrics_and_health(server, client):
    client.completions.create(model=MODEL, prompt="count tokens", max_tokens=6, temperature=0)
    text = http("GET", f"{server}/metrics")[1]
    for name in ("dopd_serve_generated_tokens_total", "dopd_serve_tau", "dopd_serve_ttft_seconds_bucket",
                 "dopd_serve_request_seconds_count", "dopd_serve_in_flight", "dopd_serve_policy_version"):  # fmt: skip
        assert name in text, name
    h = _info(server)
    assert h["status"] == "ok" and h["steps"] > 0


def test_finished_requests_feed_learning_unless_opted_out(tiny, server, client, ray_session):
    """What `--learn` builds on: a finished request's token ids reach the traffic feed (fire and forget); a request
    that opts out (body field or header) does not; weights the learner publishes to the feed reach the replica."""
    from dopd.serve import handle
    from dopd.traffic import FEED_NAME

    ray = ray_session
    feed = ray.get_actor(FEED_NAME, namespace="dopd")

    def drain(wait):
        return ray.get(feed.take.remote(1000, wait))

    deadline = time.time() + 30
    while drain(0.5) and time.time() < deadline:  # what earlier tests offered
        pass
    prompt = [int(t) for t in tiny.tokenizer.encode("learn from me", add_special_tokens=False)]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0)
    got = drain(10.0)
    assert len(got) == 1, got
    rid, p, o, replica = got[0]
    assert (p, len(o)) == (prompt, r.usage.completion_tokens) and rid == r.id and replica
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, extra_body={"dopd_learn": False})
    client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=5, temperature=0, extra_headers={"X-Dopd-Learn": "0"}
    )
    assert drain(2.0) == []

    h = handle()
    v0 = h.info.remote().result()["weights_version"]
    sd = {k: v.numpy() for k, v in eagle(tiny, 55).state_dict().items()}
    feed.publish.remote([ray.put(sd)], 7)
    deadline = time.time() + 60
    while (info := h.info.remote().result())["weights_version"] == v0 and time.time() < deadline:
        time.sleep(0.2)
    assert info["policy_version"] == 7 and info["weights_version"] == v0 + 1
    assert "dopd_serve_policy_version" in http("GET", f"{server}/metrics")[1]


def test_greedy_is_lossless_while_weights_swap_under_load(tiny, server):
    """8 concurrent greedy requests; the drafter gets new random weights 4 times while they run. Every answer is
    plain target decoding, token for token (fp32)."""
    import openai

    from dopd.serve import handle

    texts = ["hi", "write a function that sums a list", "2+2=?", "tell me a long story", "ok", "why", "abc", "xyz"]
    prompts = [chat_ids(tiny, t) for t in texts]
    refs = [plain_ids(tiny, p, 48) for p in prompts]
    h = handle()
    v0 = h.info.remote().result()["weights_version"]
    out: list[tuple[int, object]] = []
    swapped = threading.Event()

    def ask(i):  # again and again until the last swap: requests are decoding at every swap, on any machine
        c = openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=300)
        while not swapped.is_set() or not any(j == i for j, _ in out):
            out.append((i, c.completions.create(model=MODEL, prompt=prompts[i], max_tokens=48, temperature=0)))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    busy = []
    for k in range(4):
        h.set_drafter_weights.remote(eagle(tiny, 1000 + k).state_dict()).result()
        deadline = time.time() + 60
        while (info := h.info.remote().result())["weights_version"] < v0 + k + 1 and time.time() < deadline:
            time.sleep(0.02)
        assert info["weights_version"] == v0 + k + 1  # swapped in by the engine loop, between two steps
        busy.append(info["in_flight"])
        time.sleep(0.2)
    swapped.set()
    for t in threads:
        t.join()
    assert sum(b > 0 for b in busy) >= 3, busy  # the swaps happened while requests were decoding
    assert {i for i, _ in out} == set(range(len(prompts)))
    for i, r in out:
        assert r.choices[0].text == text_of(tiny, refs[i]), i
        assert r.usage.completion_tokens == len(refs[i]), i


def test_killed_replica_is_restarted_and_answers(server, client, ray_session):
    ray = ray_session
    pid = _info(server)["pid"]
    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)
    deadline, answered = time.time() + 180, None
    while time.time() < deadline and answered is None:
        try:
            answered = client.completions.create(model=MODEL, prompt="back?", max_tokens=3, temperature=0)
        except Exception:
            time.sleep(1.0)
    assert answered is not None and answered.usage.completion_tokens >= 1
    assert _info(server)["pid"] != pid
