"""`vl2 serve` under hostile traffic, against a real uvicorn server on 127.0.0.1: no other web site can use it, no
request can stall it or make it work beyond what its size allows, every refusal is OpenAI's error body. Work bounds
are asserted as bounds or as an order of events, never as timings."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest

from tests.helpers import IMG, TINY, running_server

MODEL = "tiny"
CHAT = "/v1/chat/completions"
HI = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def module_reader():
    from vl2cli.engine.loading import load_model
    from vl2cli.reader import Reader
    return Reader(load_model(TINY, device="cpu", dtype="float32", quant="none"))


@pytest.fixture(scope="module")
def served(module_reader):
    with running_server(module_reader, max_batch=8) as (url, server):
        yield url, server


def _error_shape(response: httpx.Response, status: int) -> dict:
    """OpenAI's error body, and nothing of Python in it."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    for leak in ("Traceback", " object at 0x", "File \"", "/tmp/", "site-packages"):
        assert leak not in response.text
    return error


def _port(url: str) -> int:
    return urlsplit(url).port or 80


# ---------------------------------------------------------------------------------------------- other web sites


def test_a_rebound_host_name_is_refused_and_loopback_names_are_served(served):
    url = served[0]
    port = _port(url)
    refused = httpx.get(url + "/health", headers={"Host": f"rebind.attacker.example:{port}"})
    assert _error_shape(refused, 403)["code"] == "forbidden_host"
    _error_shape(httpx.post(url + CHAT, json=HI, headers={"Host": "attacker.example"}), 403)
    for name in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "app.localhost"):
        assert httpx.get(url + "/health", headers={"Host": name}).status_code == 200, name


def test_another_sites_page_cannot_post_json_text_or_forms(served):
    url, server = served
    requests_before = server.loop.stats.requests
    foreign = {"Origin": "https://evil.example"}
    assert _error_shape(httpx.post(url + CHAT, json=HI, headers=foreign), 403)["code"] == "forbidden_origin"
    # A CORS "simple request" needs no preflight: text/plain (or a form encoding) is never read as JSON.
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        plain = httpx.post(url + CHAT, content=json.dumps(HI).encode(), headers={"Content-Type": kind})
        assert _error_shape(plain, 415)["code"] == "unsupported_media_type"
    with open(IMG, "rb") as f:
        form = httpx.post(url + "/v1/documents/ocr", files={"file": ("n.png", f)}, data={"max_tokens": "2"},
                          headers=foreign)
    _error_shape(form, 403)
    null_origin = httpx.post(url + "/v1/documents/ocr", files={"file": ("n.png", b"x")}, headers={"Origin": "null"})
    _error_shape(null_origin, 403)  # a sandboxed frame or a file:// page
    cross = httpx.post(url + CHAT, json=HI, headers={"Sec-Fetch-Site": "cross-site"})
    _error_shape(cross, 403)
    _error_shape(httpx.post(url + "/v1/documents/ocr", content=b"file=x",
                            headers={"Content-Type": "application/x-www-form-urlencoded"}), 415)
    assert server.loop.stats.requests == requests_before  # none of it reached the model
    # The server's own page is same-origin: its requests carry its own Origin and go through.
    own = httpx.post(url + CHAT, json=HI, headers={"Origin": url})
    assert own.status_code == 200 and "access-control-allow-origin" not in own.headers


def test_allowed_origins_get_cors_and_the_rest_are_still_refused(module_reader):
    app_origin = "https://app.example.com"
    with running_server(module_reader, allowed_origins=(app_origin,)) as (url, _):
        preflight = httpx.options(url + CHAT, headers={"Origin": app_origin, "Access-Control-Request-Method": "POST",
                                                       "Access-Control-Request-Headers": "content-type"})
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == app_origin
        assert "Content-Type" in preflight.headers["access-control-allow-headers"]
        reply = httpx.post(url + CHAT, json=HI, headers={"Origin": app_origin}, timeout=60)
        assert reply.status_code == 200 and reply.headers["access-control-allow-origin"] == app_origin
        other = httpx.options(url + CHAT, headers={"Origin": "https://other.example",
                                                   "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in _error_shape(other, 403) and \
            "access-control-allow-origin" not in other.headers


def test_bound_beyond_loopback_any_host_name_is_served_with_the_key(module_reader):
    with running_server(module_reader, api_key="k", host="0.0.0.0") as (url, _):
        port = _port(url)
        base = f"http://127.0.0.1:{port}"
        named = {"Host": f"gpu-box.lan:{port}", "Authorization": "Bearer k"}
        assert httpx.get(base + "/v1/models", headers=named).status_code == 200
        _error_shape(httpx.get(base + "/v1/models", headers={"Host": f"gpu-box.lan:{port}"}), 401)


# ---------------------------------------------------------------------------------------------- connections


def _raw(url: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", _port(url)), timeout=30)
    return sock


def _read_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length body from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(4096)
    return head


def test_a_client_that_stops_half_way_through_its_headers_is_closed(module_reader):
    from vl2cli.serve.guard import Connections
    with running_server(module_reader, connections=Connections(header_timeout=0.5, keep_alive_timeout=1)) as (url, _):
        stalled = _raw(url)
        stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
        assert httpx.get(url + "/health").status_code == 200  # the others are served meanwhile
        assert stalled.recv(4096) == b""  # closed by the server, without an answer
        idle = _raw(url)
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert _read_response(idle).startswith(b"HTTP/1.1 200")
        assert idle.recv(4096) == b""  # idle past the keep-alive timeout: closed
        trickle = _raw(url)
        trickle.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        _read_response(trickle)
        trickle.sendall(b"GET /heal")  # the next request's headers have the same deadline
        assert trickle.recv(4096) == b""


def test_connections_beyond_the_cap_get_503_in_openai_shape(module_reader):
    from vl2cli.serve.guard import Connections
    limits = Connections(max_connections=2, header_timeout=120, keep_alive_timeout=120)
    with running_server(module_reader, connections=limits) as (url, _):
        held = [_raw(url) for _ in range(2)]
        for sock in held:  # each is accepted and served: two connections open
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert _read_response(sock).startswith(b"HTTP/1.1 200")
        busy = httpx.get(url + "/health")
        assert _error_shape(busy, 503)["code"] == "too_many_connections"
        held[0].close()
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health").status_code != 200:  # once the server has seen the close
            assert time.monotonic() < deadline
            time.sleep(0.05)
        held[1].close()


# ---------------------------------------------------------------------------------------------- one error shape


def test_every_refusal_and_failure_is_openai_shaped(served, monkeypatch):
    url, _ = served
    post = {"headers": {"Content-Type": "application/json"}, "timeout": 60}
    assert "stream" in _error_shape(httpx.post(url + "/v1/documents/ocr?stream=maybe",
                                               files={"file": ("n.png", b"x")}), 400)["message"]
    assert _error_shape(httpx.get(url + "/v1/nothing"), 404)["code"] == "not_found"
    _error_shape(httpx.get(url + CHAT), 405)
    deep = _error_shape(httpx.post(url + CHAT, content=b"[" * 100_000, **post), 400)
    assert "nested too deeply" in deep["message"]
    lone = b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}'
    assert "surrogate" in _error_shape(httpx.post(url + CHAT, content=lone, **post), 400)["message"]
    _error_shape(httpx.post(url + CHAT, content=b"\xff\xfe{", **post), 400)
    from vl2cli.serve import app as app_module

    def bug(*_args):
        raise KeyError("/srv/secret/path.py")
    monkeypatch.setattr(app_module, "parse_chat", bug)
    failed = httpx.post(url + CHAT, json=HI, timeout=60)
    error = _error_shape(failed, 500)
    assert "/srv/secret" not in failed.text and "KeyError" not in failed.text and error["type"] == "server_error"
