"""The OpenAI wire format (vl2cli/serve/protocol.py) and how chat.py reads it: unknown fields ignored, a wrong type
a 400 naming the field, vLLM's structured-output extras taken or refused by name. No server, no model."""

from __future__ import annotations

import pytest

from vl2cli.serve.chat import ApiError, Limits, chunk_body, completion_body, parse_chat

USER = [{"role": "user", "content": "hi"}]


def refused(body: dict) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse_chat(body, Limits())
    assert caught.value.status == 400 and set(caught.value.body()["error"]) == {"message", "type", "param", "code"}
    return caught.value


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"messages": USER, "max_tokens": "100"}, "max_tokens", "expected an integer, got '100'"),
    ({"messages": USER, "max_completion_tokens": 2.5}, "max_completion_tokens", "expected an integer"),
    ({"messages": USER, "temperature": True}, "temperature", "expected a number, got true"),
    ({"messages": USER, "temperature": 9}, "temperature", "less than or equal to 2"),
    ({"messages": USER, "top_p": 0}, "top_p", "greater than 0"),
    ({"messages": USER, "stream": "yes"}, "stream", "expected true or false"),
    ({"messages": USER, "stop": 5}, "stop", "a string or a list of strings"),
    ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"messages": USER, "stream_options": {"include_usage": 1}}, "stream_options.include_usage", "true or false"),
    ({"model": 3, "messages": USER}, "model", "expected a string"),
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "'tool'"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "a string or a list of parts"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}, "messages[0].content[0].text",
     "expected a string, got 3"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "messages[0].content[0]",
     "a text or image_url part"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"uri": "x"}}]}]},
     "messages[0].content[0].image_url.url", "required"),
    ({"messages": USER, "response_format": {"type": "xml"}}, "response_format.type", "'json_schema'"),
    ({"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"schema": []}}},
     "response_format.json_schema.schema", "expected an object"),
    ({"messages": USER, "guided_json": 5}, "guided_json", "JSON Schema"),
])
def test_a_wrong_type_is_a_400_naming_the_field(body, param, words):
    error = refused(body)
    assert error.param == param and error.message.startswith(param + ": ") and words in error.message, error.message


def test_unknown_fields_are_ignored_as_openai_does():
    call = parse_chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache": 1}],
                                     "name": "me", "weird": True}],
                       "model": "tiny", "user": "x", "metadata": {"a": 1}, "store": False, "frobnicate": [1],
                       "guided_decoding_backend": "xgrammar", "max_tokens": 7}, Limits())
    assert call.max_tokens == 7 and call.grammar is None and call.model == "tiny"


def test_openai_default_penalties_and_bias_are_taken_as_no_ops():
    call = parse_chat({"messages": USER, "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}},
                      Limits())
    assert call.grammar is None and call.params.temperature == 0.0


@pytest.mark.parametrize(("extra", "kind"), [
    ({"guided_regex": "[0-9]{3}"}, "regex"),
    ({"guided_choice": ["yes", "no"]}, "lark"),
    ({"guided_grammar": 'start: "a"+'}, "lark"),
    ({"structured_outputs": {"regex": "a|b"}}, "regex"),
    ({"structured_outputs": {"choice": ["x"]}}, "lark"),
    ({"structured_outputs": {"json_object": True}}, "json_schema"),
])
def test_vllm_constraints_become_grammars(extra, kind):
    call = parse_chat({"messages": USER, **extra}, Limits())
    grammar = call.grammar_for(50)
    assert grammar is not None and grammar.kind == kind and call.constraint == next(iter(extra)) + (
        "." + next(iter(extra["structured_outputs"])) if "structured_outputs" in extra else "")


@pytest.mark.parametrize("extra", [{"guided_json": {"type": "object", "properties": {"a": {"type": "integer"}}}},
                                   {"guided_json": '{"type": "object"}'},
                                   {"structured_outputs": {"json": {"type": "array", "items": {"type": "string"}}}}])
def test_vllm_json_schemas_are_bounded_to_the_budget_as_response_format_is(extra):
    call = parse_chat({"messages": USER, "max_tokens": 64, **extra}, Limits())
    assert call.schema_json is not None and call.grammar_for(64).kind == "json_schema"


@pytest.mark.parametrize(("extra", "param"), [
    ({"structural_tag": "{}"}, "structural_tag"),
    ({"guided_whitespace_pattern": " *"}, "guided_whitespace_pattern"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern"),
    ({"structured_outputs": {"json": {}, "disable_additional_properties": True}},
     "structured_outputs.disable_additional_properties"),
    ({"guided_regex": "("}, "guided_regex"),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs.choice"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"logprobs": True}, "logprobs"),
    ({"n": 2}, "n"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"presence_penalty": -1}, "presence_penalty"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
])
def test_constraints_vl2_cannot_honour_are_refused_by_name(extra, param):
    assert refused({"messages": USER, **extra}).param == param


def test_answers_have_openai_shapes():
    body = completion_body("chatcmpl-1", "tiny", "hello", "length", 10, 3)
    assert body["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": "hello", "refusal": None},
                                  "logprobs": None, "finish_reason": "length"}
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
    assert body["object"] == "chat.completion" and isinstance(body["created"], int)
    first = chunk_body("c", "tiny", {"role": "assistant", "content": ""}, include_usage=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""} and first["usage"] is None
    last = chunk_body("c", "tiny", {}, "stop")
    assert last["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert "usage" not in last
