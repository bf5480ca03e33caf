"""`vl2 serve` under hostile traffic, against a real uvicorn server on 127.0.0.1: no other web site can use it, no
request can stall it or make it work beyond what its size allows, every refusal is OpenAI's error body. Work bounds
are asserted as bounds or as an order of events, never as timings."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import pytest

from tests.helpers import IMG, running_server

MODEL = "tiny"
CHAT = "/v1/chat/completions"
HI = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


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


# ---------------------------------------------------------------------------------------------- work bounded by size


def test_stop_strings_are_bounded_and_matched_in_linear_work(served):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from vl2cli.serve.chat import StopText
    from vl2cli.serve.protocol import MAX_STOP_CHARS

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.text("ab", min_size=1, max_size=8), min_size=1, max_size=4), st.text("abc", max_size=30))
    def same_as_every_prefix_tried(stops, text):
        before, found = StopText(tuple(stops)).cut(text)
        held = 0 if found else max((n for s in stops for n in range(1, len(s)) if before.endswith(s[:n])), default=0)
        assert StopText(tuple(stops)).safe(text) == before[:len(before) - held]
    same_as_every_prefix_tried()
    url = served[0]
    long_stop = _error_shape(httpx.post(url + CHAT, json={**HI, "stop": ["x" * (MAX_STOP_CHARS + 1)]}), 400)
    assert long_stop["param"] == "stop" and str(MAX_STOP_CHARS) in long_stop["message"]
    megabyte = _error_shape(httpx.post(url + CHAT, json={**HI, "stop": "y" * (1 << 20)}, timeout=60), 400)
    assert megabyte["param"] == "stop"
    longest = [c * MAX_STOP_CHARS for c in "wxyz"]
    reply = httpx.post(url + CHAT, json={**HI, "stop": longest, "max_tokens": 8}, timeout=60)
    assert reply.status_code == 200


def test_seeds_outside_the_generators_range_are_refused(served):
    url = served[0]
    for seed in (2**64, 2**63, -1):
        assert _error_shape(httpx.post(url + CHAT, json={**HI, "seed": seed}), 400)["param"] == "seed"
    assert httpx.post(url + CHAT, json={**HI, "seed": 2**63 - 1, "temperature": 0.7}, timeout=60).status_code == 200


def test_text_past_what_the_context_can_hold_is_refused_before_tokenizing(served, module_reader, monkeypatch):
    url, server = served
    processor = module_reader.loaded.processor
    real, tokenized = processor.prepare, []
    monkeypatch.setattr(processor, "prepare", lambda messages, *a: tokenized.append(1) or real(messages, *a))
    huge = {**HI, "messages": [{"role": "user", "content": "word " * (server.max_prompt_chars // 5 + 1)}]}
    error = _error_shape(httpx.post(url + CHAT, json=huge, timeout=60), 400)
    assert error["code"] == "context_length_exceeded" and tokenized == []
    # Tokenizing runs in a worker thread: the event loop answers /health while a prompt is being tokenized.
    tokenizing, health_answered = threading.Event(), threading.Event()

    def waits_for_health(messages, *a):
        tokenizing.set()
        assert health_answered.wait(30), "/health did not answer while a prompt was being tokenized"
        return real(messages, *a)
    monkeypatch.setattr(processor, "prepare", waits_for_health)
    with ThreadPoolExecutor(1) as pool:
        chat = pool.submit(httpx.post, url + CHAT, json=HI, timeout=60)
        assert tokenizing.wait(30)
        assert httpx.get(url + "/health", timeout=30).status_code == 200  # the loop is free while it tokenizes
        health_answered.set()
        assert chat.result().status_code == 200


def test_image_urls_must_be_images_from_public_addresses(served, monkeypatch):
    import base64
    url = served[0]

    def with_image(image_url: str) -> dict:
        return {**HI, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                               {"type": "text", "text": "read"}]}]}
    png = base64.b64encode(open(IMG, "rb").read()).decode()
    for mime in ("text/html", "application/pdf", ""):
        error = _error_shape(httpx.post(url + CHAT, json=with_image(f"data:{mime};base64,{png}")), 400)
        assert "not an image type" in error["message"]
    garbage = _error_shape(httpx.post(url + CHAT, json=with_image("data:image/png;base64,AAAA")), 400)
    assert "not a readable image" in garbage["message"]  # in words, no Pillow object repr (checked by _error_shape)


def test_remote_images_are_never_fetched_from_loopback_private_or_link_local_addresses(module_reader, monkeypatch):
    import http.server
    from ipaddress import ip_address

    from vl2cli.serve import fetch
    from vl2cli.serve.chat import Limits

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    target = listener.getsockname()[1]

    def with_image(image_url: str) -> dict:
        return {**HI, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                               {"type": "text", "text": "read"}]}]}
    with running_server(module_reader, limits=Limits(allow_remote_images=True, remote_timeout=5)) as (url, _):
        for where, kind in ((f"http://127.0.0.1:{target}/x.png", "loopback"), (f"http://localhost:{target}/x.png",
                            "loopback"), (f"http://[::ffff:127.0.0.1]:{target}/", "loopback"),
                            ("http://169.254.169.254/latest/meta-data/", "link-local"),
                            ("http://10.1.2.3/x.png", "private"), ("http://[fd00::1]/x.png", "private")):
            error = _error_shape(httpx.post(url + CHAT, json=with_image(where), timeout=60), 400)
            assert f"{kind} address" in error["message"], (where, error)
        with pytest.raises(BlockingIOError):
            listener.accept()  # refused before connecting: nothing ever reached the listener
        listener.close()

        # Let loopback through (as if it were public) to see what a client learns of a failed fetch: words only.
        monkeypatch.setattr(fetch, "address_refusal",
                            lambda ip: None if ip_address(ip) == ip_address("127.0.0.1") else "a private address")
        refused = _error_shape(httpx.post(url + CHAT, json=with_image(f"http://127.0.0.1:{target}/x.png"),
                                          timeout=60), 400)
        assert "the connection was refused" in refused["message"] and "Errno" not in refused["message"]
        image = open(IMG, "rb").read()

        class Images(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/elsewhere":  # a redirect is checked like the URL itself
                    self.send_response(302)
                    self.send_header("Location", "http://10.9.9.9/x.png")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(image)))
                self.end_headers()
                self.wfile.write(image)

            def log_message(self, *args):
                pass
        images = http.server.HTTPServer(("127.0.0.1", 0), Images)
        threading.Thread(target=images.serve_forever, daemon=True).start()
        try:
            port = images.server_address[1]
            fetched = httpx.post(url + CHAT, json=with_image(f"http://127.0.0.1:{port}/note.png"), timeout=60)
            assert fetched.status_code == 200, fetched.text
            moved = _error_shape(httpx.post(url + CHAT, json=with_image(f"http://127.0.0.1:{port}/elsewhere"),
                                            timeout=60), 400)
            assert "10.9.9.9 is a private address" in moved["message"]
        finally:
            images.shutdown()


# ---------------------------------------------------------------------------------------------- clients that leave


def _sent(url: str, request: httpx.Request) -> socket.socket:
    """A request written whole to a raw socket, its answer never read (a client that will go away)."""
    sock = _raw(url)
    head = f"{request.method} {request.url.raw_path.decode()} HTTP/1.1\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in request.headers.items()) + "\r\n"
    sock.sendall(head.encode() + request.read())
    return sock


def _until(condition, what: str) -> None:
    """Wait for an event the server will get to (a generous deadline only so a broken server fails the test)."""
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _pdf(pages: int) -> bytes:
    import io

    from PIL import Image
    out = io.BytesIO()
    Image.new("RGB", (200, 200), "white").save(out, "PDF", save_all=True,
                                              append_images=[Image.new("RGB", (200, 200), "white")] * (pages - 1))
    return out.getvalue()


def test_every_kind_of_request_is_cancelled_when_its_client_leaves(module_reader, slow_decoding):
    long_chat = {**HI, "max_tokens": 2000}
    with running_server(module_reader, max_batch=1) as (url, server):
        stats, loop = server.loop.stats, server.loop
        # A running chat that was not streamed.
        running = _sent(url, httpx.Request("POST", url + CHAT, json=long_chat))
        _until(lambda: loop.running == 1, "the chat never ran")
        # A queued one behind it: it leaves the queue at the next step, while the first still runs.
        queued = _sent(url, httpx.Request("POST", url + CHAT, json=long_chat))
        _until(lambda: loop.queue_depth == 1, "the second chat was never queued")
        queued.close()
        _until(lambda: stats.cancelled == 1, "the queued chat was not cancelled")
        assert loop.running == 1 and loop.queue_depth == 0
        running.close()
        _until(lambda: stats.cancelled == 2 and loop.running == 0, "the running chat was not cancelled")
        assert stats.generated_tokens < 1000  # stopped long before its 2000 tokens
        # Documents, read whole or streamed: the page in flight is cancelled, the pages after it never start.
        for stream in ("false", "true"):
            before, requests_before = stats.cancelled, stats.requests
            document = _sent(url, httpx.Request("POST", url + f"/v1/documents/ocr?stream={stream}",
                                                files={"file": ("three.pdf", _pdf(3))},
                                                data={"max_tokens": "2000", "split": "never"}))
            _until(lambda: loop.running == 1, "the document's first page never ran")
            document.close()
            _until(lambda before=before: stats.cancelled == before + 1 and loop.running == 0 and loop.queue_depth == 0,
                   f"the document (stream={stream}) was not cancelled")
            assert stats.requests - requests_before == 1  # its other pages were never queued
        counted = httpx.get(url + "/metrics").text
        assert "vl2_requests_cancelled_total 4" in counted.splitlines()


def test_documents_get_429_when_the_queue_is_full(module_reader, slow_decoding):
    from vl2cli.serve.chat import Limits
    with running_server(module_reader, max_batch=1, limits=Limits(max_queue=1)) as (url, server):
        long_chat = {**HI, "max_tokens": 2000}
        first = _sent(url, httpx.Request("POST", url + CHAT, json=long_chat))
        _until(lambda: server.loop.running == 1, "the first chat never ran")
        second = _sent(url, httpx.Request("POST", url + CHAT, json=long_chat))
        _until(lambda: server.loop.queue_depth == 1, "the second chat was never queued")
        full = httpx.post(url + "/v1/documents/ocr", files={"file": ("n.png", open(IMG, "rb"))}, timeout=60)
        assert _error_shape(full, 429)["type"] == "rate_limit_error"
        first.close(), second.close()
        _until(lambda: server.loop.running == server.loop.queue_depth == 0, "the chats were not cancelled")


def test_a_document_in_flight_at_shutdown_gets_503(module_reader, slow_decoding):
    for stream in (False, True):
        with running_server(module_reader, max_batch=1, drain_seconds=0.5) as (url, server):
            with ThreadPoolExecutor(2) as pool:
                document = pool.submit(httpx.post, url + f"/v1/documents/ocr?stream={stream}",
                                       files={"file": ("three.pdf", _pdf(3))},
                                       data={"max_tokens": "2000", "split": "never"}, timeout=60)
                _until(lambda: server.loop.running == 1, "the document never started")
                pool.submit(server.drain).result()
                if stream:  # the status went out with the first byte: the last line says why the pages stopped
                    last = json.loads(document.result().text.splitlines()[-1])
                    assert last["error"]["code"] == "shutting_down"
                else:
                    assert _error_shape(document.result(), 503)["code"] == "shutting_down"


def test_document_options_and_bodies_are_checked(module_reader):
    from vl2cli.serve.chat import Limits
    with running_server(module_reader, limits=Limits(max_body_bytes=64 * 1024)) as (url, server):
        pdf = _pdf(3)
        for pages in ("999999", "0", "1-3,a", "4-"):
            bad = httpx.post(url + "/v1/documents/ocr", files={"file": ("three.pdf", pdf)}, data={"pages": pages})
            assert _error_shape(bad, 400)["param"] == "pages", pages
        bad_format = httpx.post(url + "/v1/documents/table", files={"file": ("three.pdf", pdf)},
                                data={"format": "docx"})
        assert _error_shape(bad_format, 400)["param"] == "format"
        deep = httpx.post(url + "/v1/documents/extract", files={"file": ("three.pdf", pdf)},
                          data={"schema": "[" * 3000 + "]" * 3000})
        _error_shape(deep, 400)

        def chunks(body: bytes):  # no Content-Length: the body is counted as it arrives
            yield from (body[i:i + 4096] for i in range(0, len(body), 4096))
        long_text = json.dumps({**HI, "messages": [{"role": "user", "content": "x" * 200_000}]}).encode()
        assert "Content-Length" not in httpx.Request("POST", url, content=chunks(long_text)).headers
        chat = httpx.post(url + CHAT, content=chunks(long_text), headers={"Content-Type": "application/json"})
        assert _error_shape(chat, 413)["code"] == "request_too_large"
        form = httpx.Request("POST", url, files={"file": ("big.png", b"x" * 200_000)})
        upload = httpx.post(url + "/v1/documents/ocr", content=chunks(form.read()),
                            headers={"Content-Type": form.headers["Content-Type"]})
        assert _error_shape(upload, 413)["code"] == "request_too_large"
        assert server.loop.stats.requests == 0


def test_a_callers_first_request_is_refused_by_a_full_queue_and_its_later_ones_wait(module_reader, slow_decoding):
    from vl2cli.engine.generation import SamplingParams
    from vl2cli.engine.scheduler import EngineLoop, QueueFull, Request
    prompt = module_reader.loaded.processor.prepare_prompt("a question", [])
    loop = EngineLoop(module_reader.engine, max_batch=1, max_queue=1)

    def request() -> Request:
        return Request(prompt, SamplingParams(max_new_tokens=2000), 2000)
    try:
        running, queued = request(), request()
        loop.submit(running, lambda r: None)
        _until(lambda: loop.running == 1, "the first request never ran")
        loop.submit(queued, lambda r: None)
        with pytest.raises(QueueFull):  # a new caller (a document's first page): refused, the server says 429
            loop.batch().add(request())
        document = loop.batch()
        document.requests.append(running)  # a caller with a page already read: its next page waits its turn
        later = request()
        with ThreadPoolExecutor(1) as pool:
            adding = pool.submit(document.add, later)
            time.sleep(0.2)
            assert not adding.done() and not later.done
            loop.cancel(queued)  # the queue moves: the page waiting to be added gets its place
            adding.result(timeout=60)
        assert later in document.requests
    finally:
        loop.drain(0.1)


# ---------------------------------------------------------------------------------------------- PDF streams


def _pdf_with_streams(streams: list[tuple[str, bytes]]) -> bytes:
    """A one-page PDF whose page's content is these (filter, data) streams, in order."""
    contents = " ".join(f"{5 + i} 0 R" for i in range(len(streams)))
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] /Contents [{contents}] >>".encode(),
            b"[/FlateDecode]"]  # object 4: a filter reached through an indirect reference
    objs += [f"<< /Length {len(data)} /Filter {filt} >>\nstream\n".encode() + data + b"\nendstream"
             for filt, data in streams]
    out, offsets = b"%PDF-1.4\n", []
    for n, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{n} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    return out + f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()


def test_pdf_streams_that_inflate_past_the_cap_are_refused_before_pdfium_reads_them(served, tmp_path):
    import base64
    import zlib

    from tests.helpers import vl2
    from vl2cli.errors import InputError
    from vl2cli.pages import MAX_PDF_STREAM_BYTES, _inflated_size, check_pdf_streams
    bomb = zlib.compress(b"0 0 m " * (MAX_PDF_STREAM_BYTES // 6 + 1), 9)  # ~65 KB that inflate past 64 MB
    path = tmp_path / "bomb.pdf"
    path.write_bytes(_pdf_with_streams([("/FlateDecode", bomb)]))
    result = vl2("ocr", str(path))
    assert result.exit_code != 0 and "inflates to more than 64 MB" in result.stderr
    refused = httpx.post(served[0] + "/v1/documents/ocr", files={"file": ("bomb.pdf", path.read_bytes())}, timeout=60)
    assert "bomb.pdf: a compressed PDF stream inflates" in _error_shape(refused, 400)["message"]
    # Armoured, or behind a filter given by reference: the same count. The inflating is bounded by the cap too.
    mb = 1 << 20
    small_bomb = zlib.compress(b"1 1 l " * mb, 9)
    for filt, data in (("[/ASCII85Decode /FlateDecode]", base64.a85encode(small_bomb) + b"~>"),
                       ("[/AHx /Fl]", small_bomb.hex().encode() + b">"), ("4 0 R", small_bomb)):
        with pytest.raises(InputError, match="inflates to more than 1 MB"):
            check_pdf_streams("b.pdf", _pdf_with_streams([(filt, data)]), pages=1, limit=mb)
    assert _inflated_size(memoryview(bomb), mb + 1) <= 2 * mb  # counted a megabyte at a time, stopped at the cap
    # Many streams, each under the cap, count together: at most the cap per page.
    parts = [("/FlateDecode", zlib.compress(b" " * (mb * 3 // 4)))] * 2
    with pytest.raises(InputError, match="per page"):
        check_pdf_streams("two.pdf", _pdf_with_streams(parts), pages=1, limit=mb)
    check_pdf_streams("two.pdf", _pdf_with_streams(parts), pages=2, limit=mb)
    ok = tmp_path / "fine.pdf"
    ok.write_bytes(_pdf_with_streams([("/FlateDecode", zlib.compress(b"0 0 m 10 10 l S"))]))
    assert vl2("ocr", str(ok), "--json", tokens=2).exit_code == 0


def test_a_billion_laughs_json_schema_is_a_400_and_health_answers_meanwhile(served):
    """The extraction's bounder sizes each $ref once, so the server refuses the schema from its size; /health is
    answered from the same event loop right after, so the refusal held nothing up (asserted as order, not time)."""
    from tests.test_extract import billion_laughs

    url = served[0]
    body = {**HI, "response_format": {"type": "json_schema",
                                      "json_schema": {"name": "laughs", "schema": billion_laughs(8)}}}
    with ThreadPoolExecutor(2) as pool:
        refused = pool.submit(httpx.post, url + CHAT, json=body, timeout=60)
        health = pool.submit(httpx.get, url + "/health", timeout=60)
        error = _error_shape(refused.result(), 400)
        assert health.result().status_code == 200
    assert "smallest answer the schema admits" in error["message"]
