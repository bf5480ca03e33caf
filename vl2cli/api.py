"""The Python API: load a model once, read pages with a task, get records back.

    from vl2cli.api import Reader
    reader = Reader("tiny")
    records = reader.read(get_task("ocr"), pages)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from PIL import Image

from vl2cli.errors import UsageError
from vl2cli.engine.generation import Engine, Generation, SamplingParams
from vl2cli.engine.loading import LoadedModel, load_model
from vl2cli.pages import Page, looks_dense
from vl2cli.parsers import find_loop, trim_loop
from vl2cli.engine.processor import EOS_TEXT, Prepared
from vl2cli.tasks import Task

LOOP_RETRY_TEMPERATURES = (0.3, 0.5, 0.7)  # the model card advises temperature <= 0.7
DENSE_TEXT_CHARS = 2500  # a text layer this long will not fit the answer budget in one pass


class OutOfMemory(RuntimeError):
    """Raised for a CUDA out-of-memory (tests raise it directly to simulate one)."""


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, OutOfMemory) or type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc)


class PageFailed(RuntimeError):
    pass


@dataclass
class ReadOptions:
    params: SamplingParams
    text: str | None = None  # question / query
    prompt_file: str | None = None
    split: str = "auto"  # auto | never | N
    text_layer: str = "off"  # off | hint | only
    batch_size: int = 4
    loop_retries: bool = True


def split_bands(image: Image.Image, n: int, overlap: float = 0.08) -> list[Image.Image]:
    """n horizontal bands covering the page, each overlapping the next by `overlap` of the page height."""
    w, h = image.size
    band = h / n
    pad = int(h * overlap / 2)
    out = []
    for i in range(n):
        top = max(0, int(i * band) - pad)
        bottom = min(h, int((i + 1) * band) + pad)
        out.append(image.crop((0, top, w, bottom)))
    return out


def merge_band_texts(texts: list[str], max_overlap_lines: int = 12) -> str:
    """Join band answers, dropping the lines a band repeats from the end of the previous one."""
    merged: list[str] = []
    for text in texts:
        lines = text.strip().splitlines()
        best = 0
        for k in range(1, min(max_overlap_lines, len(lines), len(merged)) + 1):
            tail = [x.strip() for x in merged[-k:]]
            head = [x.strip() for x in lines[:k]]
            if tail == head and any(tail):
                best = k
        merged.extend(lines[best:])
    return "\n".join(merged).strip()


class TokenStream:
    """Prints an answer while it is generated: each new piece once its bytes decode to whole characters."""

    def __init__(self, reader: Reader, write: Callable[[str], None]):
        self.reader, self.write = reader, write
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, row: int, token: int) -> None:
        self.ids.append(token)
        text = self.reader.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return  # half a multi-byte character, or a re-segmentation: wait for more tokens
        self.write(text[len(self.shown):])
        self.shown = text


class Reader:
    def __init__(self, model: str = "tiny", device: str | None = None, dtype: str | None = None,
                 quant: str = "auto", revision: str | None = None, offline: bool | None = None,
                 prefill_chunk: int | None = None, loaded: LoadedModel | None = None):
        self.loaded = loaded or load_model(model, device=device, dtype=dtype, quant=quant, revision=revision,
                                           offline=offline)
        tok = self.loaded.processor.tokenizer
        self.engine = Engine(self.loaded.model, tok.eos_id, tok.pad_id, prefill_chunk)
        self.stop_requested = False
        self.fault_hook: Callable[[int], None] | None = None  # tests: raise OutOfMemory for a batch size

    # ---------------------------------------------------------------- generation with fallbacks

    def _stop_rule(self, ids: list[int]) -> str | None:
        if self.stop_requested:
            return "interrupted"
        return "loop" if find_loop(ids) else None

    def _within_context(self, prompts: list[Prepared], params: SamplingParams) -> SamplingParams:
        """The answer budget is what the context leaves after the longest prompt (4096 for DeepSeek-VL2)."""
        context = self.loaded.cfg.language.max_position_embeddings
        longest = max(len(p.input_ids) for p in prompts)
        room = context - longest
        if room <= 0:
            raise PageFailed(f"the prompt needs {longest} tokens, more than the model's {context}-token context")
        return replace(params, max_new_tokens=min(params.max_new_tokens, room))

    def _generate(self, prompts: list[Prepared], params: SamplingParams) -> list[Generation]:
        """Generate; on out-of-memory halve the batch, then chunk the prefill, then fail only that page."""
        params = self._within_context(prompts, params)
        try:
            if self.fault_hook:
                self.fault_hook(len(prompts))
            return self.engine.generate(prompts, params, stop_rule=self._stop_rule)
        except Exception as exc:
            if not _is_oom(exc):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(prompts) > 1:
                half = len(prompts) // 2
                return self._generate(prompts[:half], params) + self._generate(prompts[half:], params)
            if self.engine.prefill_chunk is None or self.engine.prefill_chunk > 256:
                saved = self.engine.prefill_chunk
                self.engine.prefill_chunk = 256
                try:
                    return self._generate(prompts, params)
                finally:
                    self.engine.prefill_chunk = saved
            raise PageFailed("out of memory even at batch 1 with chunked prefill") from None

    def _retry_loop(self, prompt: Prepared, params: SamplingParams) -> tuple[Generation, float | None]:
        """Re-read a looping page at rising temperatures; returns the first clean answer (or the last)."""
        last = None
        for i, temperature in enumerate(LOOP_RETRY_TEMPERATURES):
            p = SamplingParams(params.max_new_tokens, temperature, 0.9, max(params.repetition_penalty, 1.05),
                               (params.seed or 0) + i + 1)
            last = self._generate([prompt], p)[0]
            if last.finish_reason != "loop":
                return last, temperature
        return last, LOOP_RETRY_TEMPERATURES[-1]

    def decode(self, ids: list[int]) -> str:
        tok = self.loaded.processor.tokenizer
        ids = [i for i in ids if i not in (tok.eos_id, tok.pad_id)]
        return tok.decode(ids).replace(EOS_TEXT, "").strip()

    # ---------------------------------------------------------------- pages

    def prepare(self, task: Task, images: list[Image.Image], opts: ReadOptions, hint: str | None = None) -> Prepared:
        prompt = task.prompt(len(images), opts.text, opts.prompt_file)
        if hint:
            prompt += f"\nThe page's embedded text layer, for reference:\n{hint[:4000]}"
        return self.loaded.processor.prepare_prompt(prompt, images)

    def _answer(self, gens: list[Generation], prompts: list[Prepared], opts: ReadOptions) -> list[dict]:
        out = []
        for gen, prompt in zip(gens, prompts):
            flags, temperature = [], None
            if gen.finish_reason == "loop" and opts.loop_retries:
                gen, temperature = self._retry_loop(prompt, opts.params)
            ids = gen.ids
            if gen.finish_reason == "loop":
                flags.append("repetition_loop")
                ids = trim_loop(ids, find_loop(ids) or 1)
            if gen.finish_reason == "length":
                flags.append("token_budget_reached")
            out.append({"answer": self.decode(ids), "finish_reason": gen.finish_reason, "flags": flags,
                        "prompt_tokens": gen.prompt_tokens, "generated_tokens": len(gen.ids),
                        "retry_temperature": temperature})
        return out

    def read(self, task: Task, pages: list[Page], opts: ReadOptions) -> list[dict]:
        """One record per page (same order). A page that fails gets status 'failed' and its reason."""
        records: list[dict | None] = [None] * len(pages)
        work: list[tuple[int, Prepared]] = []
        for i, page in enumerate(pages):
            start = time.perf_counter()
            if opts.text_layer == "only" and (page.text_layer or "").strip():
                records[i] = self._record(task, page, opts, {"answer": page.text_layer.strip(), "flags": [],
                                          "finish_reason": "text_layer", "prompt_tokens": 0,
                                          "generated_tokens": 0}, start)
                continue
            bands = self._split_count(page, opts) if task.splittable else 1
            if bands > 1:
                records[i] = self._read_split(task, page, opts, bands)
                continue
            hint = page.text_layer if opts.text_layer == "hint" else None
            try:
                work.append((i, self.prepare(task, [page.tiling or page.image], opts, hint)))
            except Exception as exc:  # a prompt that cannot be built fails this page only
                records[i] = self._failed(task, page, str(exc))
        for begin in range(0, len(work), max(1, opts.batch_size)):
            chunk = work[begin:begin + opts.batch_size]
            start = time.perf_counter()
            try:
                gens = self._generate([p for _, p in chunk], opts.params)
            except PageFailed as exc:
                for i, _ in chunk:
                    records[i] = self._failed(task, pages[i], str(exc))
                continue
            answers = self._answer(gens, [p for _, p in chunk], opts)
            for (i, _), answer in zip(chunk, answers):
                page = pages[i]
                if opts.text_layer == "only":  # asked for the text layer, but this page has none
                    answer["flags"].append("no_text_layer")
                if (answer["finish_reason"] == "length" and task.splittable and opts.split == "auto"):
                    records[i] = self._read_split(task, page, opts, 3, first=answer)
                else:
                    records[i] = self._record(task, page, opts, answer, start, batch=len(chunk))
        return records  # type: ignore[return-value]

    def _split_count(self, page: Page, opts: ReadOptions) -> int:
        if opts.split == "never":
            return 1
        if opts.split != "auto":
            return max(1, int(opts.split))
        if page.text_layer is not None:
            dense = len(page.text_layer) > DENSE_TEXT_CHARS
        else:
            dense = looks_dense(page.image)
        return 3 if dense else 1

    def _read_split(self, task: Task, page: Page, opts: ReadOptions, n: int, first: dict | None = None) -> dict:
        start = time.perf_counter()
        bands = split_bands(page.image, n)
        prompts = [self.prepare(task, [band], opts) for band in bands]
        try:
            gens = self._generate(prompts, opts.params)
        except PageFailed as exc:
            return self._failed(task, page, str(exc))
        answers = self._answer(gens, prompts, opts)
        interrupted = any(a["finish_reason"] == "interrupted" for a in answers)
        merged = {"answer": merge_band_texts([a["answer"] for a in answers]),
                  "finish_reason": "interrupted" if interrupted else "split",
                  "flags": sorted({f for a in answers for f in a["flags"]}),
                  "prompt_tokens": sum(a["prompt_tokens"] for a in answers),
                  "generated_tokens": sum(a["generated_tokens"] for a in answers)}
        record = self._record(task, page, opts, merged, start)
        record["split"] = {"bands": n, "reason": "budget" if first else "dense"}
        return record

    def _record(self, task: Task, page: Page, opts: ReadOptions, answer: dict, start: float, batch: int = 1) -> dict:
        w, h = page.image.size
        record = {"source": page.source, "page": page.number, "task": task.name, "status": "ok",
                  "width": w, "height": h, **answer, "seconds": round((time.perf_counter() - start) / batch, 3)}
        if task.name == "caption":
            record["mode"] = "caption"
        record.update(task.parse(answer["answer"], w, h, opts.text))
        if answer["finish_reason"] == "interrupted":
            record["status"] = "interrupted"
        return record

    def _failed(self, task: Task, page: Page, reason: str) -> dict:
        return {"source": page.source, "page": page.number, "task": task.name, "status": "failed", "error": reason}

    def ask_images(self, images: list[Image.Image], question: str, params: SamplingParams,
                   history: list | None = None, on_token: Callable[[int, int], None] | None = None) -> str:
        """Multi-image question (and chat turns); all images go into one prompt."""
        from vl2cli.engine.processor import Message
        from vl2cli.tasks import image_marks
        if history:  # the images stay in the first user turn
            messages = list(history) + [Message("user", question)]
        else:
            messages = [Message("user", image_marks(len(images)) + question, list(images))]
        prepared = self.loaded.processor.prepare(messages)
        try:
            params = self._within_context([prepared], params)
        except PageFailed as exc:
            raise UsageError(f"{exc}: ask about fewer pages (--pages) or use `vl2 batch --task ask`") from None
        gen = self.engine.generate([prepared], params, on_token=on_token, stop_rule=self._stop_rule)[0]
        return self.decode(gen.ids)
