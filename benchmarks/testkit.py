"""What the tests and the benchmarks both build on, kept out of the package because production never calls it:
models with random weights at any config's real shapes, what a model holds (which linears bitsandbytes swapped in,
the bytes they take), random answers a grammar admits (no model needed), PDFs with a real text layer (fpdf2) or a
password (pikepdf), and the synchronous ways of driving the scheduler and the reader (production runs the engine
loop, or streams pages through `Reader.read_stream`).

It lives here rather than in tests/ because the benchmarks run as scripts from this folder (`python
benchmarks/run.py`, `benchmarks/gpu_check.sh` on a bare GPU machine) and must not import the test suite; pytest puts
this folder on the path (pyproject's `pythonpath`), so the tests import it by the same name. fpdf2 is imported
only where a PDF is made, so the GPU check needs nothing beyond the package itself.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from vl2cli.engine.grammar import Grammar, GrammarError
from vl2cli.engine.loading import build_model, place_tensor
from vl2cli.engine.quant import is_quantizable
from vl2cli.engine.scheduler import Request

if TYPE_CHECKING:
    import random

    import llguidance

    from vl2cli.engine.config import FamilyConfig
    from vl2cli.engine.generation import SamplingParams
    from vl2cli.engine.processor import Prepared
    from vl2cli.engine.scheduler import Scheduler
    from vl2cli.options import ReadOptions
    from vl2cli.pages import Page
    from vl2cli.reader import Reader
    from vl2cli.results import PageResult
    from vl2cli.tasks import Task

# ------------------------------------------------------------------ models

# The spread of random weights: the usual transformer initialisation (`initializer_range` in the checkpoints'
# configs), so activations stay near the range real weights keep them in.
INIT_STD = 0.02


def random_model(cfg: FamilyConfig, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 quant: str = "none", seed: int = 0, std: float = INIT_STD) -> Any:
    """A model of this config with random weights, placed exactly as the loader places a checkpoint's (quantized
    where `quant` says): the same speed and memory as real weights, without a download."""
    dev = torch.device(device)
    model, swapped = build_model(cfg, dtype, quant)
    gen = torch.Generator(device=dev).manual_seed(seed)
    for name, p in list(model.named_parameters()):
        if name.endswith(".bias"):
            t = torch.zeros(p.shape, device=dev)
        elif p.dim() == 1 and "norm" in name:
            t = torch.ones(p.shape, device=dev)
        else:
            t = torch.randn(p.shape, generator=gen, device=dev) * std
        place_tensor(model, name, t, swapped, dev, dtype)
    return model


# ------------------------------------------------------------------ what a model holds


def is_quantized_module(module: nn.Module) -> bool:
    """A linear layer bitsandbytes swapped in (4-bit or 8-bit), by its class name: bitsandbytes may be absent."""
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def linear_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes held by quantizable linear layers (weights, scales, bias) and by the whole model.

    bitsandbytes keeps a copy of the same constant lookup table in every layer's quant state;
    each distinct table is counted once, as a shared constant.
    """
    quant, total = 0, 0
    tables: set[tuple[int, float]] = set()
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            size = p.numel() * p.element_size()
            state = getattr(p, "quant_state", None)
            if state is not None:
                size += _state_bytes(state, tables)
            scb = getattr(p, "SCB", None)
            if scb is not None:
                size += scb.numel() * scb.element_size()
            total += size
            if (isinstance(module, nn.Linear) or is_quantized_module(module)) and is_quantizable(name):
                quant += size
    return {"quantizable_linear_bytes": quant, "model_bytes": total}


def _state_bytes(state: Any, tables: set[tuple[int, float]]) -> int:
    """`state`: a bitsandbytes QuantState (absmax, code, nested state2 and offset)."""
    size = state.absmax.numel() * state.absmax.element_size()
    code = getattr(state, "code", None)
    if code is not None:
        key = (code.numel(), round(float(code.float().sum()), 6))
        if key not in tables:
            tables.add(key)
            size += code.numel() * code.element_size()
    nested = getattr(state, "state2", None)
    if nested is not None:
        size += _state_bytes(nested, tables)
        if getattr(state, "offset", None) is not None:
            size += state.offset.numel() * state.offset.element_size()
    return size


# ------------------------------------------------------------------ driving the engine and the reader


def submit(scheduler: Scheduler, prompt: Prepared, params: SamplingParams, grammar: Grammar | None = None) -> Request:
    """Queue one request on a bare scheduler (its budget: the params' max_new_tokens); the request comes back to be
    watched."""
    request = Request(prompt, params, params.max_new_tokens, grammar)
    scheduler.add(request)
    return request


def run_to_idle(scheduler: Scheduler) -> None:
    """Step until every queued request has ended."""
    while not scheduler.idle:
        scheduler.step()


def read_pages(reader: Reader, task: Task, pages: Sequence[Page], opts: ReadOptions) -> list[PageResult]:
    """One result per page, in the pages' order (the reader hands them out as each ends)."""
    done = dict(reader.read_stream(task, enumerate(pages), opts))
    return [done[i] for i in range(len(pages))]


# ------------------------------------------------------------------ grammars without a model


def random_walk(grammar: Grammar, tokenizer: llguidance.LLTokenizer, rng: random.Random, max_tokens: int,
                terse: float = 0.0) -> tuple[list[int], bool]:
    """A random answer the grammar admits, without a model: each step takes a token the grammar allows, uniformly
    (what random weights amount to); with probability `terse`, the end token or a token that closes a value when
    one is allowed (a model that answers briefly). The ids, and whether the answer ended within `max_tokens`."""
    import llguidance
    import numpy as np
    matcher = llguidance.LLMatcher(tokenizer, grammar.compiled, log_level=0)
    eos = tokenizer.eos_token
    closing = _closing_tokens(tokenizer)
    ids: list[int] = []
    while len(ids) < max_tokens:
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = np.flatnonzero(bits[: tokenizer.vocab_size])
        if not len(allowed):
            raise GrammarError(f"the grammar allows no token after {len(ids)}: {matcher.get_error()[:200]}")
        pick = allowed
        if terse and rng.random() < terse:
            ending = allowed[np.isin(allowed, [eos])] if eos in allowed else allowed[closing[allowed]]
            pick = ending if len(ending) else allowed
        token = int(pick[rng.randrange(len(pick))])
        if token == eos:
            return ids, True
        if not matcher.consume_token(token):
            raise GrammarError(f"the grammar rejected token {token} it allowed: {matcher.get_error()[:200]}")
        ids.append(token)
    return ids, False


_CLOSING: dict[int, Any] = {}


def _closing_tokens(tokenizer: llguidance.LLTokenizer) -> Any:
    """Per token id: whether its bytes end a JSON value (a quote, a closing bracket or brace)."""
    import numpy as np
    key = id(tokenizer)
    if key not in _CLOSING:
        _CLOSING[key] = np.array([any(c in tokenizer.decode_bytes([i]) for c in b'"]}')
                                  for i in range(tokenizer.vocab_size)])
    return _CLOSING[key]


# ------------------------------------------------------------------ PDFs

LETTER = (612, 792)  # US letter in points: the page every text PDF here has unless told otherwise
MARGIN = 72  # one inch, in points
FIRST_BASELINE = 52  # points below the top edge: an upright page's first line (24 pt capitals end inside the inch)
LINE_SPACING = 1.2  # baseline to baseline, in font sizes (a typesetter's usual leading)
FIXED_DATE = datetime(2026, 1, 1, tzinfo=timezone.utc)  # fpdf2 writes the date into the file: fixed, the bytes are too


def text_pdf(text: str, pages: int = 1, lines: list[str] | None = None, size: int = 24, angle: int = 0,
             rotate: int = 0, page_lines: list[list[str]] | None = None,
             page_size: tuple[float, float] = LETTER) -> bytes:
    """A PDF with Helvetica text in its text layer: one line per page ("{text} pN"), the given `lines` on every page,
    or each page's own lines (`page_lines`, one list per page). `angle`: the text is drawn turned counterclockwise
    by it (0, 90, 180, 270), each line below the last as the text reads, starting a margin in from the corner that
    keeps it on the page. `rotate`: each page's /Rotate (a viewer turns the page clockwise by it). `page_size`:
    (width, height) in points."""
    from fpdf import FPDF

    width, height = page_size
    # where the first line's baseline starts (fpdf2 measures y from the top), for text turned by each angle
    origin = {0: (MARGIN, FIRST_BASELINE), 90: (MARGIN, height - MARGIN),
              180: (width - MARGIN, height - MARGIN), 270: (width - MARGIN, MARGIN)}[angle]
    pdf = FPDF(unit="pt", format=(width, height))
    pdf.set_creation_date(FIXED_DATE)
    pdf.set_auto_page_break(False)
    pdf.set_font("Helvetica", size=size)
    for i in range(len(page_lines) if page_lines else pages):
        pdf.add_page()
        x, y = origin
        with pdf.rotation(angle, x, y):
            for n, line in enumerate(page_lines[i] if page_lines else lines or [f"{text} p{i + 1}"]):
                pdf.text(x, y + n * size * LINE_SPACING, line)
    made = bytes(pdf.output())
    return _with_page_rotation(made, rotate) if rotate else made


def _with_page_rotation(made: bytes, rotate: int) -> bytes:
    """Every page given /Rotate: fpdf2 writes no /Rotate, pikepdf sets it on the finished file."""
    import pikepdf

    out = io.BytesIO()
    with pikepdf.open(io.BytesIO(made)) as pdf:
        for page in pdf.pages:
            page.Rotate = rotate
        pdf.save(out, deterministic_id=True)
    return out.getvalue()


def encrypted_pdf(text: str, user_password: str, owner_password: str = "owner",
                  revision: Literal[2, 3, 4, 6] = 6) -> bytes:
    """A one-page text PDF that opens only with `user_password`: AES-256 at revision 6 (what current tools write),
    RC4 at revisions 2 to 4 (what older PDFs have), by qpdf's standard security handler through pikepdf."""
    import pikepdf

    out = io.BytesIO()
    with pikepdf.open(io.BytesIO(text_pdf("", lines=[text]))) as pdf:
        pdf.save(out, encryption=pikepdf.Encryption(user=user_password, owner=owner_password,
                                                    R=revision, aes=revision >= 5, metadata=revision >= 5))
    return out.getvalue()
