"""The pipelines people already run, against a real `vl2 serve` (the tiny checkpoint, random weights): olmOCR's and
docling's exact request shapes replayed (tests/data/clients/, recorded from their source), LangChain, LiteLLM and
the openai SDK's `parse` driven themselves, and what they rely on: answer budgets lowered to what the context
leaves, vLLM's structured-output extras, x-request-id, /v1/models/{id}.

Third-party clients are optional here and skip with the reason when absent; `.ci/run` installs them and sets
VL2_REQUIRE_CLIENTS, so in CI a missing client fails instead. docling and olmOCR end to end are slow tests."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
from pathlib import Path

import httpx
import openai
import pytest
import regex  # partial matches (a prefix the pattern admits); installed with transformers

from tests.helpers import DATA, IMG, SAMPLES, running_server, vl2

MODEL = "tiny"
RECORDED = DATA / "clients"
OLMOCR_REGEX = json.loads((RECORDED / "olmocr-0.4.27.json").read_text())["body"]["guided_regex"]


def needs(module: str):
    """A third-party client: imported, or the test skips saying so (fails in CI, where it must be installed)."""
    if os.environ.get("VL2_REQUIRE_CLIENTS"):
        return __import__(module)
    return pytest.importorskip(module, reason=f"{module} is not installed (.ci/run installs the clients: pip install -r "
                                              ".ci/clients.txt && pip install --no-deps -r .ci/clients-nodeps.txt)")


@pytest.fixture(scope="module")
def served(module_reader):
    with running_server(module_reader, max_batch=4) as (url, server):
        yield url, server


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0, timeout=300)


def page_png(page: int = 1, longest: int | None = None, scale: float = 2.0, mode: str = "RGB") -> str:
    """samples/report.pdf's page as base64 PNG, rendered as the client renders it (olmOCR: longest side 1288;
    docling: scale 2)."""
    import pypdfium2 as pdfium
    pdf = pdfium.PdfDocument(str(SAMPLES / "report.pdf"))
    width, height = pdf[page - 1].get_size()
    image = pdf[page - 1].render(scale=longest / max(width, height) if longest else scale).to_pil().convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def filled(shape: dict, **values: str) -> dict:
    """A recorded body with its placeholders ({model}, {image}) filled."""
    return json.loads(json.dumps(shape).replace("{model}", values["model"]).replace("{image}", values["image"]))


def raw_post(url: str, path: str, body: dict, lines: list[str]) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request written by hand, header lines exactly as given (as olmOCR's `apost` does)."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body)
    head = "\r\n".join(line.format(path=path, host=host, length=len(payload)) for line in lines)
    with socket.create_connection((host, int(port)), timeout=600) as sock:
        sock.sendall((head + "\r\n\r\n" + payload).encode())
        data = b""
        while chunk := sock.recv(1 << 16):
            data += chunk
    head_bytes, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head_bytes.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    assert "content-length" in headers or headers.get("connection") == "close"  # what apost needs to read it
    return int(status_line.split()[1]), headers, rest


def front_matter(text: str) -> dict[str, str]:
    """olmOCR's front matter (its FrontMatterParser's rules): the block between the first two '---' lines."""
    match = re.match(r"---\n(.*?)\n---", text, re.S)
    assert match, text[:200]
    return dict(line.split(": ", 1) for line in match.group(1).splitlines())


# ---------------------------------------------------------------------------------------------- budgets


def _long_text(reader, tokens: int) -> str:
    """A user message whose prompt is `tokens` long (give or take a few)."""
    from vl2cli.serve.chat import Limits, parse_chat
    words = "lorem ipsum dolor sit amet " * (tokens // 2)

    def size(text: str) -> int:
        call = parse_chat({"messages": [{"role": "user", "content": text}]}, Limits())
        return len(reader.loaded.processor.prepare(call.messages).input_ids)
    low, high = 0, len(words)
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if size(words[:mid]) <= tokens else (low, mid - 1)
    return words[:low]


def test_an_oversized_answer_budget_is_lowered_to_what_the_context_leaves(served, module_reader):
    url, _ = served
    context = module_reader.context
    text = _long_text(module_reader, context - 24)
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 8000, "temperature": 0.1}
    reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    assert reply.status_code == 200, reply.text
    usage = reply.json()["usage"]
    room = context - usage["prompt_tokens"]
    assert 0 < usage["completion_tokens"] <= room and usage["total_tokens"] <= context
    assert reply.headers["x-vl2-max-tokens"] == f"{room}; asked=8000"  # said, not silent
    assert reply.json()["choices"][0]["finish_reason"] in ("stop", "length")
    streamed = httpx.post(url + "/v1/chat/completions", json={**body, "stream": True,
                                                               "stream_options": {"include_usage": True}}, timeout=300)
    assert streamed.status_code == 200 and streamed.headers["x-vl2-max-tokens"] == f"{room}; asked=8000"
    events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert events[-1]["usage"]["completion_tokens"] <= room
    within = httpx.post(url + "/v1/chat/completions", timeout=300,
                        json={**body, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert "x-vl2-max-tokens" not in within.headers and within.json()["usage"]["completion_tokens"] == 3


def test_a_prompt_that_does_not_fit_is_context_length_exceeded(served, module_reader):
    text = _long_text(module_reader, module_reader.context + 40)
    reply = httpx.post(served[0] + "/v1/chat/completions", timeout=300,
                       json={"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 5})
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "context_length_exceeded"
    assert "maximum context length is 4096 tokens" in reply.json()["error"]["message"]


def test_refuse_policy_keeps_openai_strictness(module_reader):
    with running_server(module_reader, max_tokens_policy="refuse") as (url, _):
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        refused = httpx.post(url + "/v1/chat/completions", json={**body, "max_tokens": 8000}, timeout=60)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
        assert httpx.post(url + "/v1/chat/completions", json={**body, "max_tokens": 2}, timeout=60).status_code == 200
    from vl2cli.errors import UsageError
    from vl2cli.serve.app import ServeSettings
    with pytest.raises(UsageError, match="clamp or refuse"):
        ServeSettings("tiny", max_tokens_policy="lenient")
    result = vl2("serve", "--max-tokens-policy", "lenient", tokens=None)
    assert result.exit_code == 2 and "--max-tokens-policy lenient: expected clamp or refuse" in result.stderr


# ---------------------------------------------------------------------------------------------- vLLM's extras


def test_guided_regex_constrains_the_answer(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe the page."}], max_tokens=120, temperature=0.8,
        seed=3, extra_body={"guided_regex": OLMOCR_REGEX})
    text = reply.choices[0].message.content
    fields = front_matter(text if text.count("---") >= 2 else text + "\n---")  # cut by the budget: still parses
    assert set(fields) == {"primary_language", "is_rotation_valid", "rotation_correction", "is_table", "is_diagram"}
    assert fields["rotation_correction"] in ("0", "90", "180", "270")
    finish = reply.choices[0].finish_reason
    assert finish in ("stop", "length"), finish
    # whole when it stopped; when the budget cut it (as it does here), a beginning the regex admits
    assert regex.fullmatch(OLMOCR_REGEX, text, partial=finish == "length"), text


@pytest.mark.parametrize("field", ["guided_choice", "structured_outputs"])
def test_guided_choice_answers_one_of_the_choices(client, field):
    choices = ["positive", "negative", 'neutral "maybe"']
    extra = {"guided_choice": choices} if field == "guided_choice" else {"structured_outputs": {"choice": choices}}
    for seed in (0, 1, 2):
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Sentiment?"}],
                                               max_tokens=20, temperature=1.0, seed=seed, extra_body=extra)
        assert reply.choices[0].message.content in choices and reply.choices[0].finish_reason == "stop"


def test_guided_json_and_grammar_constrain_the_answer(client):
    # bounded values: a random model's digits run on, and an unbounded integer is never narrowed to fit the budget
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999},
                                               "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "JSON"}],
                                           max_tokens=60, temperature=0.7, seed=1, extra_body={"guided_json": schema})
    assert set(json.loads(reply.choices[0].message.content)) == {"n", "ok"}
    lark = 'start: "The answer is " NUMBER "."\nNUMBER: /[0-9]{1,3}/'
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Number?"}],
                                           max_tokens=20, temperature=0.7, seed=1,
                                           extra_body={"structured_outputs": {"grammar": lark}})
    assert re.fullmatch(r"The answer is [0-9]{1,3}\.", reply.choices[0].message.content)


def test_an_unsupported_constraint_is_a_400_naming_it(served):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "structural_tag": "{}"}
    reply = httpx.post(served[0] + "/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "structural_tag"
    typed = httpx.post(served[0] + "/v1/chat/completions", timeout=60,
                       json={**body, "structural_tag": None, "max_tokens": "8000"})
    assert typed.status_code == 400 and typed.json()["error"]["param"] == "max_tokens"


# ---------------------------------------------------------------------------------------------- headers, metrics


def test_every_response_carries_a_request_id(served, client):
    url = served[0]
    mine = httpx.get(url + "/v1/models", headers={"X-Request-Id": "trace-42"})
    assert mine.headers["x-request-id"] == "trace-42"
    ours = {httpx.get(url + "/v1/models").headers["x-request-id"] for _ in range(2)}
    assert len(ours) == 2 and all(r.startswith("req-") for r in ours)
    assert httpx.get(url + "/nowhere").headers["x-request-id"]  # errors too
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert reply._request_id and reply._request_id.startswith("req-")  # what the openai SDK shows


def test_a_model_by_id_is_counted_under_its_own_path(served, client):
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    metrics = httpx.get(served[0] + "/metrics").text
    counted = re.search(r'vl2_http_requests_total\{path="/v1/models/\{model\}"\} (\d+)', metrics)
    assert counted and int(counted.group(1)) >= 2


# ---------------------------------------------------------------------------------------------- recorded shapes


def test_olmocr_request_shape_gets_a_200_whose_front_matter_parses(served):
    """olmOCR 0.4.27's page request, byte for byte in its headers: raw HTTP/1.1 with `Host` without a port and
    `Connection: close`, max_tokens 8000 (twice the tiny model's context), temperature 0.1, guided_regex."""
    url = served[0]
    shape = json.loads((RECORDED / "olmocr-0.4.27.json").read_text())
    body = filled(shape["body"], model=MODEL, image=page_png(1, longest=shape["image"]["longest_side"]))
    status, headers, raw = raw_post(url, "/v1/chat/completions", body, shape["raw_headers"])
    assert status == 200, raw[:300]
    answer = json.loads(raw)
    assert answer["choices"][0]["finish_reason"] in ("stop", "length")
    usage = answer["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] <= 4096
    text = answer["choices"][0]["message"]["content"]
    assert set(front_matter(text if text.count("---") >= 2 else text + "\n---")) >= {"primary_language", "is_table"}
    assert headers["x-vl2-max-tokens"].endswith("asked=8000")


@pytest.mark.parametrize("recording", ["docling-2.143-preset.json", "docling-2.143-legacy-stream.json"])
def test_docling_request_shapes_get_answers(served, recording):
    """docling's two API paths as recorded: the preset engine (max_tokens 8192, stop strings) and the legacy
    options with a stopper (SSE, `Accept: text/event-stream`, `X-Temperature`, max_tokens 4096)."""
    shape = json.loads((RECORDED / recording).read_text())
    body = filled(shape["body"], model=MODEL, image=page_png(1, scale=2.0, mode=shape["image"]["mode"]))
    reply = httpx.post(served[0] + "/v1/chat/completions", json=body, headers=shape["headers"], timeout=600)
    assert reply.status_code == 200, reply.text[:300]
    if body.get("stream"):
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in reply.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] in (
            ["stop"], ["length"])
    else:
        answer = reply.json()
        assert answer["choices"][0]["finish_reason"] in ("stop", "length") and answer["usage"]["total_tokens"] <= 4096


# ---------------------------------------------------------------------------------------------- real clients


def test_openai_sdk_parse_with_a_pydantic_model(client):
    from pydantic import BaseModel

    class Invoice(BaseModel):
        total: float
        currency: str
        paid: bool

    parsed = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "The invoice."}],
                                           response_format=Invoice, max_tokens=120, temperature=0.5, seed=2)
    message = parsed.choices[0].message
    assert parsed.choices[0].finish_reason == "stop" and isinstance(message.parsed, Invoice)


def test_langchain_chat_stream_batch_and_structured_output(served):
    langchain_openai = needs("langchain_openai")
    from pydantic import BaseModel, Field

    chat = langchain_openai.ChatOpenAI(model=MODEL, base_url=served[0] + "/v1", api_key="unused", max_tokens=6,
                                       temperature=0, max_retries=0, timeout=300)
    image = base64.b64encode(Path(IMG).read_bytes()).decode()
    message = {"role": "user", "content": [{"type": "text", "text": "Read it."},
                                           {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}]}
    whole = chat.invoke([message])
    assert whole.response_metadata["finish_reason"] == "length" and whole.usage_metadata["output_tokens"] == 6
    assert "".join(str(c.content) for c in chat.stream([message])) == whole.content
    assert [r.content for r in chat.batch([[message], [message]])] == [whole.content] * 2

    class Reading(BaseModel):  # bounded fields: vl2 never narrows a schema to fit a budget on its own
        title: str = Field(max_length=20)
        pages: int = Field(ge=0, le=999)

    roomy = langchain_openai.ChatOpenAI(model=MODEL, base_url=served[0] + "/v1", api_key="unused", max_tokens=120,
                                        temperature=0, max_retries=0, timeout=300)
    assert isinstance(roomy.with_structured_output(Reading, method="json_schema").invoke("As JSON."), Reading)


def test_litellm_completion_stream_json_schema_and_async(served):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of its price list
    litellm = needs("litellm")
    import asyncio
    common = {"model": f"openai/{MODEL}", "api_base": served[0] + "/v1", "api_key": "unused", "max_tokens": 6,
              "temperature": 0}
    messages = [{"role": "user", "content": "Say something."}]
    reply = litellm.completion(messages=messages, **common)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 6
    chunks = list(litellm.completion(messages=messages, stream=True, **common))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    shaped = litellm.completion(messages=messages, **{**common, "max_tokens": 40}, response_format={
        "type": "json_schema", "json_schema": {"name": "r", "schema": schema, "strict": True}})
    assert set(json.loads(shaped.choices[0].message.content)) == {"ok"}

    async def together() -> list[str]:
        replies = await asyncio.gather(*(litellm.acompletion(messages=messages, **common) for _ in range(3)))
        return [r.choices[0].message.content for r in replies]
    assert asyncio.run(together()) == [reply.choices[0].message.content] * 3


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_olmocr_pipeline_converts_the_sample_through_vl2_serve(served, tmp_path):
    """`python -m olmocr.pipeline WS --server URL/v1 --model tiny --pdfs report.pdf --guided_decoding`: every page
    request gets a 200 whose front matter parses (olmOCR logs a warning for a non-200 and for an unparsable answer);
    with random weights it may then reject the text itself (finish_reason 'length') and fall back to pdftotext."""
    import shutil
    import subprocess
    import sys
    needs("olmocr")
    if not shutil.which("pdftoppm") and not os.environ.get("VL2_REQUIRE_CLIENTS"):
        pytest.skip("olmOCR renders pages with poppler's pdftoppm (apt-get install poppler-utils)")
    url, server = served
    before = server.http_requests.get("/v1/chat/completions", 0)
    run = subprocess.run([sys.executable, "-m", "olmocr.pipeline", str(tmp_path / "workspace"), "--server", url + "/v1",
                          "--model", MODEL, "--pdfs", str(SAMPLES / "report.pdf"), "--guided_decoding",
                          "--max_page_retries", "1", "--workers", "1"],
                         capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    assert server.http_requests.get("/v1/chat/completions", 0) - before == 3  # one request per page, no retries
    assert "Server returned" not in log and "try_single_page failed" not in log, log[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("path", ["preset", "legacy"])
def test_docling_converts_the_sample_through_vl2_serve(served, path):
    """docling's VLM pipeline pointed at vl2 serve: the preset path its docs recommend (max_tokens 8192) and the
    legacy ApiVlmOptions with a stopper (SSE). Every page gets an answer with usage and a stop reason; docling then
    judges the random-weight text (a 'length' stop is its 'VLM output incomplete')."""
    needs("docling")
    from docling.backend.pypdfium2_backend import PyPdfiumDocumentBackend
    from docling.datamodel.base_models import InputFormat, VlmStopReason
    from docling.datamodel.pipeline_options import VlmConvertOptions, VlmPipelineOptions
    from docling.datamodel.pipeline_options_vlm_model import ApiVlmOptions, ResponseFormat
    from docling.datamodel.vlm_engine_options import ApiVlmEngineOptions, VlmEngineType
    from docling.document_converter import DocumentConverter, PdfFormatOption
    from docling.models.utils.generation_utils import DocTagsRepetitionStopper
    from docling.pipeline.vlm_pipeline import VlmPipeline

    endpoint = served[0] + "/v1/chat/completions"
    if path == "preset":
        options = VlmConvertOptions.from_preset("granite_docling", engine_options=ApiVlmEngineOptions(
            engine_type=VlmEngineType.API, url=endpoint, params={"model": MODEL}, timeout=900, concurrency=3))
    else:
        options = ApiVlmOptions(url=endpoint, params={"model": MODEL, "max_tokens": 4096}, timeout=900, scale=2.0,
                                prompt="Convert this page to docling.", response_format=ResponseFormat.DOCTAGS,
                                temperature=0.0, custom_stopping_criteria=[DocTagsRepetitionStopper(N=32)])
    pipeline = VlmPipelineOptions(vlm_options=options, enable_remote_services=True)
    converter = DocumentConverter(format_options={InputFormat.PDF: PdfFormatOption(
        pipeline_cls=VlmPipeline, pipeline_options=pipeline, backend=PyPdfiumDocumentBackend)})
    result = converter.convert(str(SAMPLES / "report.pdf"), page_range=(1, 3 if path == "preset" else 1))
    assert len(result.pages) == (3 if path == "preset" else 1)
    for page in result.pages:
        answer = page.predictions.vlm_response
        assert answer is not None and answer.error_message is None and answer.text
        if path == "preset":  # (the SSE path asks for no usage: it sends no stream_options)
            assert answer.stop_reason in (VlmStopReason.LENGTH, VlmStopReason.END_OF_SEQUENCE)
            assert answer.usage["total_tokens"] == answer.usage["prompt_tokens"] + answer.usage["completion_tokens"]
            assert answer.num_tokens == answer.usage["total_tokens"] <= 4096
    assert all("incomplete" in e.error_message for e in result.errors), result.errors


def test_marker_service_call_shape(client):
    """marker 2.0's OpenAIService call (marker/services/openai.py): `beta.chat.completions.parse` with a pydantic
    schema, a webp data URL before the prompt, its X-Title and HTTP-Referer headers, and no max_tokens (the budget is
    what the context leaves). marker itself needs its layout models downloaded first, which tests cannot do."""
    from typing import Literal

    from PIL import Image
    from pydantic import BaseModel

    class BlockCheck(BaseModel):  # marker's schemas are pydantic models; this one keeps the answer short
        is_table: bool
        kind: Literal["text", "table", "figure"]

    webp = io.BytesIO()
    Image.open(IMG).convert("RGB").save(webp, format="WEBP")
    parts = [{"type": "image_url", "image_url": {"url": "data:image/webp;base64,"
                                                        + base64.b64encode(webp.getvalue()).decode()}},
             {"type": "text", "text": "Is this block a table?"}]
    response = client.beta.chat.completions.parse(
        extra_headers={"X-Title": "Marker", "HTTP-Referer": "https://github.com/datalab-to/marker"},
        model=MODEL, messages=[{"role": "user", "content": parts}], timeout=300, response_format=BlockCheck)
    assert isinstance(response.choices[0].message.parsed, BlockCheck) and response.usage.total_tokens <= 4096
    assert json.loads(response.choices[0].message.content)["kind"] in ("text", "table", "figure")
