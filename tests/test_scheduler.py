"""Continuous batching: requests join and leave the running batch at step boundaries, and each gets exactly the
tokens it would get alone."""

from __future__ import annotations

import pytest
from PIL import Image
from testkit import read_pages, run_to_idle, submit

from tests.helpers import IMG


@pytest.fixture
def engine_and_prompts(loaded_tiny):
    from vl2cli.engine.generation import Engine
    from vl2cli.engine.grammar import grammar_tokenizer
    tok = loaded_tiny.processor.tokenizer
    llg = grammar_tokenizer(tok.tok.to_str(), loaded_tiny.cfg.language.vocab_size, tok.eos_id)
    engine = Engine(loaded_tiny.model, tok.eos_id, tok.pad_id, grammar_tokenizer=lambda: llg)
    image = Image.open(IMG)
    prompts = [loaded_tiny.processor.prepare_prompt(f"<image>\nRead part {i}.", [image]) if i % 2
               else loaded_tiny.processor.prepare_prompt("Q" * (i + 1) + " a text-only question", []) for i in range(7)]
    return engine, prompts


def test_greedy_tokens_equal_one_at_a_time_while_requests_join_and_leave(engine_and_prompts):
    from vl2cli.engine.generation import SamplingParams
    from vl2cli.engine.scheduler import Scheduler, generate
    engine, prompts = engine_and_prompts
    budgets = [5, 17, 9, 30, 3, 12, 21]
    alone = [generate(engine, [p], SamplingParams(max_new_tokens=b))[0].ids for p, b in zip(prompts, budgets)]
    scheduler = Scheduler(engine, max_batch=3)
    requests = [submit(scheduler, p, SamplingParams(max_new_tokens=b)) for p, b in zip(prompts, budgets)]
    sizes = []
    while not scheduler.idle:
        scheduler.step()
        sizes.append(len(scheduler.running))
    assert [r.result.ids for r in requests] == alone
    assert max(sizes) == 3 and len(set(sizes)) > 1  # the batch refilled as short requests left


def test_rows_keep_their_own_sampling_grammar_and_budget(engine_and_prompts, loaded_tiny):
    import json

    from vl2cli.engine.generation import SamplingParams
    from vl2cli.engine.grammar import Grammar
    from vl2cli.engine.scheduler import Scheduler
    engine, prompts = engine_and_prompts
    sampled = SamplingParams(max_new_tokens=10, temperature=1.0, seed=7)
    schema = Grammar.from_json_schema({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                                                "maximum": 99}},
                                       "required": ["n"], "additionalProperties": False})
    alone = Scheduler(engine, max_batch=1)
    reference = submit(alone, prompts[0], sampled)
    run_to_idle(alone)
    crowded = Scheduler(engine, max_batch=4)
    same = submit(crowded, prompts[0], sampled)
    constrained = submit(crowded, prompts[1], SamplingParams(max_new_tokens=40), grammar=schema)
    greedy = submit(crowded, prompts[2], SamplingParams(max_new_tokens=6))
    run_to_idle(crowded)
    assert same.result.ids == reference.result.ids  # its own generator: batch-mates change nothing
    text = loaded_tiny.processor.tokenizer.decode(constrained.result.ids[:-1])  # the end token closes it
    assert constrained.result.finish_reason == "stop" and json.loads(text)["n"] in range(100)
    assert len(greedy.result.ids) == 6 and greedy.result.finish_reason == "length"


def test_cancel_frees_the_row_and_the_queue_is_bounded(engine_and_prompts):
    from vl2cli.engine.generation import SamplingParams
    from vl2cli.engine.scheduler import QueueFull, Scheduler
    engine, prompts = engine_and_prompts
    scheduler = Scheduler(engine, max_batch=2, max_queue=3)
    first = submit(scheduler, prompts[0], SamplingParams(max_new_tokens=50))
    second = submit(scheduler, prompts[1], SamplingParams(max_new_tokens=50))
    third = submit(scheduler, prompts[2], SamplingParams(max_new_tokens=4))
    scheduler.step()
    assert scheduler.running == [first, second]
    scheduler.cancel(first)
    scheduler.step()  # the cancelled row leaves; the waiting request takes its place at the next boundary
    assert first.done and first.result.finish_reason == "cancelled" and first not in scheduler.running
    scheduler.step()
    assert third in scheduler.running and len(scheduler.running) == 2
    for p in prompts[:3]:
        submit(scheduler, p, SamplingParams(max_new_tokens=2))
    with pytest.raises(QueueFull):
        submit(scheduler, prompts[0], SamplingParams(max_new_tokens=2))
    run_to_idle(scheduler)
    assert second.done and third.result.finish_reason == "length"


def test_a_short_page_never_waits_for_the_longest_page_of_its_batch(reader, page_image, monkeypatch):
    """Pages join the running batch as others leave: with two rows, a long page keeps running while the short
    pages after it are admitted, finish and are handed out first."""
    from vl2cli.options import ReadOptions
    from vl2cli.pages import Page
    from vl2cli.tasks import get_task
    budgets = iter([40, 3, 3, 3])
    real = type(reader)._request

    def with_budget(self, *args, **kwargs):
        request = real(self, *args, **kwargs)
        request.budget = next(budgets)
        return request
    monkeypatch.setattr(type(reader), "_request", with_budget)
    pages = [(i, Page("a.png", i + 1, page_image)) for i in range(4)]
    order = [key for key, result in reader.read_stream(get_task("ocr"), pages, ReadOptions(
        max_new_tokens=40, split="never", batch_size=2, loop_retries=False))]
    assert order == [1, 2, 3, 0]


def test_a_long_prefill_is_chunked_between_the_running_rows_decode_steps(engine_and_prompts):
    from vl2cli.engine.generation import SamplingParams
    from vl2cli.engine.scheduler import Scheduler, generate
    engine, prompts = engine_and_prompts
    long_prompt = prompts[1]  # an image page: hundreds of tokens
    alone = [generate(engine, [p], SamplingParams(max_new_tokens=12))[0].ids for p in (prompts[0], long_prompt)]
    engine.prefill_chunk = 32
    try:
        scheduler = Scheduler(engine, max_batch=2)
        running = submit(scheduler, prompts[0], SamplingParams(max_new_tokens=12))
        scheduler.step()  # the short prompt fits one chunk: it is decoding after this step
        joining = submit(scheduler, long_prompt, SamplingParams(max_new_tokens=12))
        tokens_during_prefill = []
        while not joining.result.ids:
            before = len(running.result.ids)
            scheduler.step()
            tokens_during_prefill.append(len(running.result.ids) - before)
        run_to_idle(scheduler)
    finally:
        engine.prefill_chunk = None
    chunks = -(-len(long_prompt.input_ids) // 32)
    assert len(tokens_during_prefill) == chunks > 10  # one step per chunk, and the running row decoded in each
    assert tokens_during_prefill[:10] == [1] * 10
    assert [running.result.ids, joining.result.ids] == alone


def test_the_slot_cache_never_grows_over_hundreds_of_requests_joining_and_leaving(engine_and_prompts, loaded_tiny):
    """Mixed prompt lengths, budgets and prefill chunks, rows joining and leaving in every order: the cache is
    allocated once (slots x context), each running row holds exactly its own tokens, and every request gets the
    greedy tokens it gets alone."""
    import random

    from vl2cli.engine.generation import SamplingParams
    from vl2cli.engine.scheduler import Scheduler, generate
    engine, _ = engine_and_prompts
    rng = random.Random(26)
    prompts = [loaded_tiny.processor.prepare_prompt("word " * rng.randrange(1, 40) + f"question {i}", [])
               for i in range(12)]
    longest = 24
    alone = [generate(engine, [p], SamplingParams(max_new_tokens=longest))[0].ids for p in prompts]
    scheduler = Scheduler(engine, max_batch=4, max_queue=1000, context=160)
    requests = []
    for _ in range(240):
        which = rng.randrange(len(prompts))
        request = submit(scheduler, prompts[which], SamplingParams(max_new_tokens=rng.randrange(1, longest + 1)))
        request.prefill_chunk = rng.choice([None, 3, 8])
        requests.append((which, request))
    cache, sizes = None, set()
    while not scheduler.idle:
        if rng.random() < 0.3 and scheduler.running:  # a client going away mid-answer
            scheduler.cancel(rng.choice(scheduler.running))
        scheduler.step()
        cache = cache or scheduler.cache
        assert scheduler.cache is cache and cache.capacity == 4 * 160
        held = [len(r.prompt.input_ids) + len(r.result.ids) - 1 for r in scheduler.running]
        joining = range(scheduler._join_first, scheduler._join_first + len(scheduler.joining))
        assert cache.lengths[:len(held)] == held
        assert not any(n for slot, n in enumerate(cache.lengths) if slot >= len(held) and slot not in joining)
        assert scheduler.used == sum(cache.lengths) <= cache.capacity
        sizes.add(len(scheduler.running))
    assert sizes >= {1, 2, 3, 4} and scheduler.peak_used <= 4 * 160
    for which, request in requests:
        ids = request.result.ids
        if request.result.finish_reason != "cancelled":
            assert ids == alone[which][:request.budget], (which, request.result.finish_reason)
        else:
            assert ids == alone[which][:len(ids)]


def _submit_all(loop, requests, then=None):
    """Submit, call `then()` (when given), and wait until every request has been answered."""
    import threading
    ended = threading.Semaphore(0)
    for request in requests:
        loop.submit(request, lambda _r: ended.release())
    if then is not None:
        then()
    for _ in requests:
        assert ended.acquire(timeout=120), "a request was never answered"


def _text_requests(loaded_tiny, n, budget=6, **kwargs):
    from vl2cli.engine.generation import SamplingParams
    from vl2cli.engine.scheduler import Request
    return [Request(loaded_tiny.processor.prepare_prompt(f"question number {i}", []),
                    SamplingParams(max_new_tokens=budget), budget, **kwargs) for i in range(n)]


def test_an_out_of_memory_storm_past_the_queue_bound_never_stops_the_engine_loop(engine_and_prompts, loaded_tiny,
                                                                                 monkeypatch):
    """Failed steps put their requests back past the queue bound (it is checked at submit only); a storm of
    out-of-memory steps and a raising stop rule end with every request answered and the loop up."""
    import threading
    import time

    import torch

    from vl2cli.engine.scheduler import EngineLoop
    engine, _ = engine_and_prompts
    real, storm = engine.decode_step, iter(range(12))
    raining = threading.Event()

    def flaky(tokens, cache):
        if raining.is_set() and next(storm, None) is not None:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real(tokens, cache)
    monkeypatch.setattr(engine, "decode_step", flaky)
    monkeypatch.setattr(engine, "eos_id", -1)  # every answer runs to its budget
    loop = EngineLoop(engine, max_batch=4, max_queue=2)
    try:
        assert loop.cache_capacity == 4 * engine.context  # allocated up front: the gauge is true from the start
        first, second = _text_requests(loaded_tiny, 2, budget=40), _text_requests(loaded_tiny, 2, budget=40)

        def more():
            deadline = time.monotonic() + 30
            while loop.running < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            _submit_all(loop, second, then=raining.set)  # 4 in flight, then every step fails for a while
        _submit_all(loop, first, then=more)
        assert all(r.done for r in first + second) and loop.health() is None
        raining.clear()
        assert next(storm, 12) >= 4  # steps failed with 4 in flight, 2, 1, and chunked: each put back past the bound
        assert {r.result.finish_reason for r in first + second} <= {"length", "error"}

        def broken(ids, constrained):
            raise ValueError("a stop rule's bug")
        bad = _text_requests(loaded_tiny, 1, stop_rule=broken)[0]
        good = _text_requests(loaded_tiny, 1)
        _submit_all(loop, [bad, *good])
        assert bad.failure is not None and "stop rule's bug" in bad.failure.message
        assert all(r.failure is None and len(r.result.ids) == 6 for r in good), [(r.failure, r.result) for r in good]
        assert loop.health() is None and loop.cache_used == 0
    finally:
        loop.drain(1.0)


def test_a_dead_or_stalled_engine_thread_is_reported_and_no_caller_waits_forever(engine_and_prompts, loaded_tiny,
                                                                                 monkeypatch):
    import threading
    import time

    from vl2cli.engine.scheduler import Closed, EngineLoop
    engine, _ = engine_and_prompts
    real = engine.decode_step
    slow = threading.Event()

    def stalling(tokens, cache):
        if slow.is_set():
            time.sleep(0.6)
        return real(tokens, cache)
    monkeypatch.setattr(engine, "decode_step", stalling)
    loop = EngineLoop(engine, max_batch=2, max_queue=8, stall_seconds=0.3)
    try:
        slow.set()
        request = _text_requests(loaded_tiny, 1, budget=4)[0]
        loop.submit(request, lambda _r: None)
        deadline = time.monotonic() + 30
        while loop.health() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "no step for" in (loop.health() or "")
        slow.clear()
        while not request.done and time.monotonic() < deadline:
            time.sleep(0.05)
        assert request.done and loop.health() is None
    finally:
        loop.drain(1.0)

    loop = EngineLoop(engine, max_batch=2, max_queue=8)
    monkeypatch.setattr(loop.runner, "step", lambda: (_ for _ in ()).throw(SystemExit("killed")))
    waiting = _text_requests(loaded_tiny, 3)
    _submit_all(loop, waiting)  # every caller is told, none waits forever
    assert all(r.failure is not None and "engine thread stopped" in r.failure.message for r in waiting)
    loop._thread.join(5)
    assert "stopped" in (loop.health() or "")
    with pytest.raises(Closed):
        loop.submit(_text_requests(loaded_tiny, 1)[0], lambda _r: None)


def test_a_looping_page_is_re_read_in_the_running_batch_while_the_others_go_on(reader, page_image, monkeypatch):
    """A loop retry is one more request in the same running batch: the other page keeps decoding through all of
    the looping page's re-reads (counted in decode steps), and bands of a page run side by side."""
    from vl2cli.options import LOOP_RETRY_TEMPERATURES, ReadOptions
    from vl2cli.pages import Page
    from vl2cli.tasks import get_task
    engine = reader.engine
    monkeypatch.setattr(engine, "eos_id", -1)  # every answer runs to its budget unless a rule stops it
    steps, sizes = [0], []
    real_step = engine.decode_step

    def counted(tokens, cache):
        steps[0] += 1
        sizes.append(tokens.shape[0])
        return real_step(tokens, cache)
    monkeypatch.setattr(engine, "decode_step", counted)
    real_request = type(reader)._page_request

    def looping_first_page(self, task, template, page, opts, params):
        request = real_request(self, task, template, page, opts, params)
        if page.number == 1:  # every read of page 1 "loops" at its 4th token
            request.stop_rule = lambda ids, constrained: "loop" if len(ids) >= 4 else None
        return request
    monkeypatch.setattr(type(reader), "_page_request", looping_first_page)
    pages = [(n, Page("a.png", n, page_image)) for n in (1, 2)]
    ended_at = {}
    for key, result in reader.read_stream(get_task("ocr"), pages, ReadOptions(max_new_tokens=40, split="never",
                                                                              batch_size=2)):
        ended_at[key] = (steps[0], result)
    looped_at, looped = ended_at[1]
    other_at, other = ended_at[2]
    assert looped.retry_temperature == LOOP_RETRY_TEMPERATURES[-1] and "repetition_loop" in looped.flags
    assert other.generated_tokens == 40
    # page 2 needed 40 steps and got them while page 1 was read 1 + 3 times beside it (4 x 4 tokens): nested
    # retries would have stopped it for their 12 steps
    assert looped_at < other_at <= 40 and max(sizes) == 2 and sizes.count(2) >= 4 * 3
    monkeypatch.setattr(type(reader), "_page_request", real_request)
    sizes.clear()
    banded = read_pages(reader, get_task("ocr"), [Page("a.png", 1, page_image)], ReadOptions(max_new_tokens=5, split="3",
                                                                                       batch_size=4))[0]
    assert banded.split.bands == 3 and sizes == [3] * 4  # the three bands decoded side by side (5 tokens: 1 + 4 steps)


def test_answer_text_is_decoded_a_token_at_a_time_and_equals_the_whole_decode(reader):
    """Incremental detokenization: each token decoded once (never the answer from the start), the pieces joining
    to the whole decode, multi-byte characters waiting for their last token; the CLI's stream shows the same."""
    from vl2cli.reader import AnswerText, TokenStream
    tok = reader.loaded.processor.tokenizer
    words = "  Total: 1,234.50 € — Ünïcödé 日本語 テキスト. " * 20
    ids = [*tok.tok.encode(words, add_special_tokens=False).ids, tok.eos_id]
    text = AnswerText(reader)
    pieces = [text.push(i) for i in ids]
    assert "".join(pieces) == text.text and text.text.strip() == reader.decode(ids)
    assert text.tail(9) == text.text[-9:] and text.length == len(text.text)
    written: list[str] = []
    stream = TokenStream(reader, written.append)
    for i in ids:
        stream(0, i)
    assert "".join(written) == stream.shown == reader.decode(ids)  # stripped at both ends, as the answer is
    again = AnswerText(reader)
    again.feed(ids[:5])
    again.feed(ids[:3])  # the request started over (a failed step): so does its text
    assert again.count == 3 and again.text == AnswerText(reader).feed(ids[:3])
