"""The server's request handling that needs no Ray: the API key check, request parsing, stop-string hold-back."""

from __future__ import annotations

import types

import pytest

from dopd.openai_api import ApiError, ChatRequest, CompletionRequest, parse
from dopd.serve import DopdServer, key_hash
from dopd.serve_loop import hold_back


def _request(headers: dict):
    return types.SimpleNamespace(headers={k.lower(): v for k, v in headers.items()})


def test_api_key_is_checked_against_its_hash():
    cls = DopdServer.func_or_class
    server = types.SimpleNamespace(key_sha=key_hash("s3cret"))
    cls._auth(server, _request({"Authorization": "Bearer s3cret"}))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        with pytest.raises(ApiError) as e:
            cls._auth(server, _request(headers))
        assert e.value.status == 401 and e.value.code == "invalid_api_key"
    cls._auth(types.SimpleNamespace(key_sha=None), _request({}))  # no key set (loopback): anyone
    assert "s3cret" not in key_hash("s3cret")


def test_parse_names_the_bad_field():
    with pytest.raises(ApiError, match="not valid JSON"):
        parse(b"{", CompletionRequest)
    with pytest.raises(ApiError, match="JSON object"):
        parse(b"[1, 2]", CompletionRequest)
    with pytest.raises(ApiError) as e:
        parse(b'{"model": "m", "messages": []}', ChatRequest)
    assert e.value.param == "messages" and e.value.status == 400
    with pytest.raises(ApiError, match="at most 4"):
        parse(b'{"model": "m", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', CompletionRequest).stop_list()
    r = parse(b'{"model": "m", "prompt": "x", "max_tokens": 7, "unknown_field": 1}', CompletionRequest)
    assert r.token_budget(16) == 7 and r.dopd_learn is True


def test_hold_back_keeps_a_possible_stop_prefix():
    assert hold_back("hello wor", ["world"]) == 3
    assert hold_back("hello", ["xyz"]) == 0
    assert hold_back("ab<", ["<|end|>", "b<|"]) == 2
