"""`vl2 serve`: a real uvicorn server on 127.0.0.1, driven by the official openai client (and raw HTTP for the
error paths): images, streaming, JSON schemas, usage, concurrency, auth, limits, disconnects, documents, drain."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
from PIL import Image

from tests.helpers import IMG, PAGE_IMG, SAMPLES, TINY, running_server, vl2

MODEL = "tiny"


def data_url(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(open(path, "rb").read()).decode()


def image_message(text: str, path: str = IMG) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(path)}},
                                         {"type": "text", "text": text}]}]


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def _alone(reader, messages: list[dict], max_tokens: int) -> tuple[list[int], int]:
    """The library's own greedy answer ids to a chat body, and its prompt length."""
    from vl2cli.engine.generation import SamplingParams
    from vl2cli.engine.scheduler import generate
    from vl2cli.serve.chat import Limits, parse_chat
    call = parse_chat({"messages": messages}, Limits())
    prepared = reader.loaded.processor.prepare(call.messages)
    return generate(reader.engine, [prepared], SamplingParams(max_new_tokens=max_tokens))[0].ids, len(
        prepared.input_ids)


def test_models_lists_the_id_clients_send(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2)


def test_a_chat_with_a_base64_image_answers_as_the_library_does(client, module_reader):
    messages = image_message("What does the note say?")
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6)
    ids, prompt_tokens = _alone(module_reader, messages, 6)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == module_reader.decode(ids)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.model == MODEL
    assert reply.usage.prompt_tokens == prompt_tokens and reply.usage.completion_tokens == len(ids) == 6
    assert reply.usage.total_tokens == prompt_tokens + 6
    assert choice.finish_reason == "length"  # the budget ended it


def test_streaming_gives_the_same_text_in_openai_chunks(client):
    messages = image_message("Read it.")
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_response_format_json_schema_gives_schema_valid_json(client):
    schema = {"type": "object", "properties": {"total": {"type": "integer", "minimum": 0, "maximum": 99999},
                                              "currency": {"type": "string", "enum": ["EUR", "USD"]},
                                              "lines": {"type": "array", "maxItems": 3,
                                                        "items": {"type": "string", "maxLength": 12}}},
              "required": ["total", "currency", "lines"], "additionalProperties": False}  # fits 200 tokens
    for seed in (0, 1):
        reply = client.chat.completions.create(
            model=MODEL, messages=image_message("The invoice as JSON."), max_tokens=200, temperature=0.8, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "invoice", "schema": schema,
                                                                    "strict": True}})
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    free = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "JSON please"}],
                                          max_tokens=300, response_format={"type": "json_object"})
    assert free.choices[0].finish_reason == "stop"  # greedy (the default) under the grammar: an object that closes
    assert isinstance(json.loads(free.choices[0].message.content), dict)


def test_stop_strings_end_the_answer_before_them(client):
    base = client.chat.completions.create(model=MODEL, messages=image_message("Read it."), max_tokens=12)
    text = base.choices[0].message.content
    stop = text[4:6]
    assert stop.strip()
    cut = client.chat.completions.create(model=MODEL, messages=image_message("Read it."), max_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=MODEL, messages=image_message("Read it."), max_tokens=12,
                                              stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text[:text.index(stop)]


def test_system_messages_are_folded_into_the_first_user_turn(module_reader):
    from vl2cli.serve.chat import Limits, parse_chat
    call = parse_chat({"messages": [{"role": "system", "content": "Answer in French."},
                                    {"role": "user", "content": "Hello <|ref|>x<|/ref|> <image>"},
                                    {"role": "assistant", "content": "Bonjour"},
                                    {"role": "user", "content": "Again"}]}, Limits())
    prepared = module_reader.loaded.processor.prepare(call.messages)
    tok = module_reader.loaded.processor.tokenizer
    text = tok.decode(prepared.input_ids)
    assert "Answer in French.\n\nHello" in text and text.index("French") < text.index("Bonjour")
    assert tok.tok.token_to_id("<|ref|>") in prepared.input_ids  # grounding marks pass through as tokens
    assert not any(prepared.image_mask)  # a typed <image> is text, never an image slot


def test_eight_concurrent_requests_match_one_at_a_time(client, served, module_reader):
    bodies = [image_message(f"Read part {i}.", IMG if i % 2 else PAGE_IMG) if i % 3 else
              [{"role": "user", "content": f"Question number {i}?" * (i + 1)}] for i in range(8)]
    budgets = [5, 9, 14, 20, 7, 11, 3, 16]
    alone = [module_reader.decode(_alone(module_reader, b, n)[0]) for b, n in zip(bodies, budgets)]
    steps_before = served[1].loop.stats.steps
    start = threading.Barrier(8)

    def ask(i: int) -> str:
        start.wait()
        reply = client.chat.completions.create(model=MODEL, messages=bodies[i], max_tokens=budgets[i])
        return reply.choices[0].message.content
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    assert together == alone
    assert served[1].loop.stats.steps - steps_before < sum(budgets)  # rows shared decode steps


def _post(url: str, path: str, **kwargs) -> httpx.Response:
    return httpx.post(url + path, timeout=60, **kwargs)


def _error_shape(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_bad_requests_get_400_with_an_openai_error_body(served):
    url = served[0]
    garbage = "data:image/png;base64," + base64.b64encode(b"not a png at all").decode()
    cases = {
        "n": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2},
        "image": {"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": garbage}}]}]},
        "remote": {"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}]},
        "file": {"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]},
        "temperature": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 9},
        "schema": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                   "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "frobnicate"}}}},
    }
    messages = {k: _error_shape(_post(url, "/v1/chat/completions", json=body), 400)["message"]
                for k, body in cases.items()}
    assert "n must be 1" in messages["n"] and "not a readable image" in messages["image"]
    assert "--allow-remote-images" in messages["remote"] and "scheme" in messages["file"]
    assert "temperature" in messages["temperature"]  # budgets and the context: tests/test_clients.py
    _error_shape(_post(url, "/v1/chat/completions", content=b"{not json",
                       headers={"Content-Type": "application/json"}), 400)


def test_documents_give_the_same_records_as_the_cli(served):
    url = served[0]
    with open(IMG, "rb") as f:
        response = _post(url, "/v1/documents/ocr", files={"file": ("note.png", f, "image/png")},
                         data={"max_tokens": "12", "split": "never"})
    assert response.status_code == 200, response.text
    records = response.json()
    expected = json.loads(vl2("ocr", IMG, "--json", "--split", "never", tokens=12).stdout)
    assert len(records) == len(expected) == 1
    assert records[0]["source"] == "note.png"  # the client's name, never a server path

    def timeless(record: dict) -> dict:
        return {k: v for k, v in record.items() if k not in ("seconds", "source")}
    assert [timeless(r) for r in records] == [timeless(r) for r in expected]
    pdf = SAMPLES / "report.pdf"
    with open(pdf, "rb") as f:
        streamed = _post(url, "/v1/documents/ocr?stream=true", files={"file": ("report.pdf", f)},
                         data={"max_tokens": "4", "pages": "1-2", "split": "never"})
    assert streamed.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in streamed.text.splitlines()]
    assert sorted(r["page"] for r in lines) == [1, 2] and streamed.headers["X-Vl2-Pages"] == "2"
    bad = _post(url, "/v1/documents/ocr", files={"file": ("broken.pdf", b"%PDF-1.7 truncated nonsense")})
    assert "broken.pdf" in _error_shape(bad, 400)["message"]
    _error_shape(_post(url, "/v1/documents/ask", files={"file": ("n.png", open(IMG, "rb"))}), 400)  # no question
    _error_shape(_post(url, "/v1/documents/translate", files={"file": ("n.png", open(IMG, "rb"))}), 404)


METRIC_TYPES = {"vl2_requests": "counter", "vl2_requests_failed": "counter", "vl2_requests_cancelled": "counter",
                "vl2_documents": "counter", "vl2_prompt_tokens": "counter", "vl2_generated_tokens": "counter",
                "vl2_queue_depth": "gauge", "vl2_running_batch_size": "gauge",
                "vl2_time_per_output_token_seconds": "gauge", "vl2_decode_steps": "counter", "vl2_engine_up": "gauge",
                "vl2_kv_cache_capacity_tokens": "gauge", "vl2_kv_cache_used_tokens": "gauge",
                "vl2_http_requests": "counter"}  # a counter's family is named without its samples' _total


def _scrape(url: str) -> dict[tuple[str, tuple], float]:
    """/metrics parsed by Prometheus' own client library (a line it cannot read raises): {(sample, labels): value},
    after checking the families and their types."""
    from prometheus_client.parser import text_string_to_metric_families
    response = httpx.get(url + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = list(text_string_to_metric_families(response.text))
    assert {f.name: f.type for f in families} == METRIC_TYPES
    assert all(f.documentation for f in families)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}
    unlabelled = {name for name, labels in samples if not labels}
    assert unlabelled == {n + "_total" if t == "counter" else n for n, t in METRIC_TYPES.items()} - {
        "vl2_http_requests_total"}, unlabelled  # one sample a family; the HTTP counter's are by path
    return samples


def test_metrics_are_prometheus_text(served, client):
    pytest.importorskip("prometheus_client", reason="the test extra installs prometheus-client to parse /metrics")
    url = served[0]
    before = _scrape(url)
    reply = client.chat.completions.create(model=MODEL, messages=image_message("Read it."), max_tokens=5)
    after = _scrape(url)

    def moved(name: str, labels: tuple = ()) -> float:
        return after[(name, labels)] - before.get((name, labels), 0.0)
    assert moved("vl2_requests_total") == 1 and moved("vl2_requests_failed_total") == 0
    assert moved("vl2_prompt_tokens_total") == reply.usage.prompt_tokens
    assert moved("vl2_generated_tokens_total") == reply.usage.completion_tokens == 5
    assert 1 <= moved("vl2_decode_steps_total") < 5  # the first token comes from the prefill
    assert moved("vl2_http_requests_total", (("path", "/v1/chat/completions"),)) == 1
    assert after[("vl2_engine_up", ())] == 1 and after[("vl2_kv_cache_capacity_tokens", ())] > 0
    assert after[("vl2_queue_depth", ())] == after[("vl2_running_batch_size", ())] == 0
    assert after[("vl2_kv_cache_used_tokens", ())] == 0 and after[("vl2_time_per_output_token_seconds", ())] > 0
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_auth_limits_and_a_full_queue(module_reader, slow_decoding):
    pdf = io.BytesIO()
    Image.new("RGB", (200, 200), "white").save(pdf, "PDF", save_all=True,
                                              append_images=[Image.new("RGB", (200, 200), "white")] * 2)
    from vl2cli.serve.chat import Limits
    limits = Limits(max_body_bytes=1 << 20, max_queue=1, max_pages=2)
    with running_server(module_reader, api_key="s3cret", max_batch=1, limits=limits) as (url, _):
        assert httpx.get(url + "/health").status_code == 200
        _error_shape(httpx.get(url + "/v1/models"), 401)
        _error_shape(httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        keyed = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0, timeout=60)
        assert keyed.models.list().data[0].id == MODEL
        auth = {"Authorization": "Bearer s3cret"}
        big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
        _error_shape(_post(url, "/v1/chat/completions", json=big, headers=auth), 413)
        pages = _post(url, "/v1/documents/ocr", files={"file": ("three.pdf", pdf.getvalue())}, headers=auth)
        assert "at most 2" in _error_shape(pages, 413)["message"]
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60}
        with ThreadPoolExecutor(5) as pool:
            replies = list(pool.map(lambda _: _post(url, "/v1/chat/completions", json=body, headers=auth),
                                    range(5)))
        codes = sorted(r.status_code for r in replies)
        assert codes.count(200) >= 2 and 429 in codes, codes
        assert _error_shape(next(r for r in replies if r.status_code == 429), 429)["type"] == "rate_limit_error"


def test_a_client_that_disconnects_frees_its_slot(module_reader, slow_decoding):
    with running_server(module_reader, max_batch=2) as (url, server):
        stream = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "A long story."}], max_tokens=2000, stream=True)
        for n, _chunk in enumerate(stream):
            if n == 3:
                break
        assert server.loop.running == 1
        stream.close()
        deadline = time.monotonic() + 10
        while server.loop.running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.loop.running == 0 and server.loop.stats.cancelled == 1
        assert server.loop.stats.generated_tokens < 500  # stopped long before its 2000 tokens (40 s)


def test_a_drain_finishes_running_requests_and_refuses_queued_ones(module_reader, slow_decoding):
    with running_server(module_reader, max_batch=1, drain_seconds=20) as (url, server):
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200}

        def until(condition) -> None:  # the order of events, not their timing (a loaded machine is slow)
            deadline = time.monotonic() + 60
            while not condition():
                assert time.monotonic() < deadline
                time.sleep(0.02)
        with ThreadPoolExecutor(3) as pool:
            running = pool.submit(_post, url, "/v1/chat/completions", json=body)
            until(lambda: server.loop.running == 1)
            queued = pool.submit(_post, url, "/v1/chat/completions", json=body)
            until(lambda: server.loop.queue_depth == 1)
            pool.submit(server.drain)
            assert running.result().status_code == 200
            assert running.result().json()["usage"]["completion_tokens"] == 200
            _error_shape(queued.result(), 503)
        _error_shape(_post(url, "/v1/chat/completions", json=body), 503)


def test_a_bug_in_one_request_is_a_500_and_the_server_goes_on(module_reader, monkeypatch):
    def broken(ids, constrained):
        raise AttributeError("a bug only this request meets")
    with running_server(module_reader) as (url, server):
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        with monkeypatch.context() as patch:
            patch.setattr(module_reader, "stop_rule", broken)
            with pytest.raises(openai.InternalServerError, match="a bug only this request meets"):
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4)
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert reply.usage.completion_tokens == 4 and server.loop.stats.failed == 1


def test_binding_beyond_loopback_needs_a_key():
    result = vl2("serve", "--host", "0.0.0.0", tokens=None)
    assert result.exit_code == 2 and "--api-key" in result.stderr


@pytest.mark.slow
def test_vl2_serve_starts_answers_and_stops_on_ctrl_c():
    import signal
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-m", "vl2cli.cli", "serve", "--model", TINY, "--port", "0"],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        while line and "serving" not in line:
            line = proc.stderr.readline()
        url = line.split(" at ")[1].split("/ ")[0]
        assert httpx.get(url + "/health").json() == {"status": "ok", "model": "tiny"}
        page = httpx.get(url + "/").text
        assert "<title>vl2 · tiny</title>" in page and "http" not in page.split("<body>")[1]  # nothing remote
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130  # drained, then the usual Ctrl-C exit status
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()


def test_health_is_503_with_the_reason_when_the_engine_thread_is_gone(module_reader, monkeypatch):
    """The engine gauges tell the cache's size and use; a dead engine thread is a 503 with its reason, and
    vl2_engine_up says 0."""
    from tests.helpers import running_server
    with running_server(module_reader, max_batch=2) as (url, server):
        text = httpx.get(url + "/metrics").text
        values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}
        assert values["vl2_engine_up"] == 1
        assert values["vl2_kv_cache_capacity_tokens"] == 2 * module_reader.engine.context
        assert values["vl2_kv_cache_used_tokens"] == 0
        monkeypatch.setattr(server.loop.runner, "step", lambda: (_ for _ in ()).throw(SystemExit("killed")))
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        assert _post(url, "/v1/chat/completions", json=body).status_code == 500  # answered, not left waiting
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and "engine thread has stopped" in health.json()["reason"]
        assert "vl2_engine_up 0" in httpx.get(url + "/metrics").text
        _error_shape(_post(url, "/v1/chat/completions", json=body), 503)


def test_documents_format_gives_the_body_the_cli_prints(served):
    """`format` shapes the (not streamed) answer as `vl2 TASK -f FMT` prints it: text formats as text, jsonl a
    record a line; json stays the records list."""
    url, pdf = served[0], SAMPLES / "report.pdf"
    for fmt, pages, media in (("markdown", "1-2", "text/markdown"), ("text", "1", "text/plain"),
                              ("jsonl", "1-2", "application/x-ndjson")):
        with open(pdf, "rb") as f:
            response = _post(url, "/v1/documents/ocr", files={"file": ("report.pdf", f)},
                             data={"max_tokens": "4", "pages": pages, "split": "never", "format": fmt})
        assert response.status_code == 200 and response.headers["content-type"].startswith(media), response.text
        cli = vl2("ocr", str(pdf), "--pages", pages, "--split", "never", "-f", fmt, tokens=4).stdout
        if fmt == "jsonl":
            def timeless(line: str) -> dict:
                return {k: v for k, v in json.loads(line).items() if k not in ("seconds", "source")}
            assert [timeless(x) for x in response.text.splitlines()] == [timeless(x) for x in cli.splitlines()]
        else:
            assert response.text.strip() == cli.replace(str(pdf), "report.pdf").strip(), fmt
    assert "<!-- page 2: report.pdf -->" in _post(
        url, "/v1/documents/ocr", files={"file": ("report.pdf", open(pdf, "rb"))},
        data={"max_tokens": "4", "pages": "1-2", "split": "never", "format": "markdown"}).text
