"""The options: declared once (`OPTIONS`), typed and validated on construction (`PageOptions`, `ReadOptions`).

`OPTIONS` is the one table of the words a user can give: each option's name, type, default, help, command-line
flags, the server's document form field, and the commands that take it. The Typer commands' parameters
(`vl2cli/flags.py`) and the server's document form fields (`serve/app.py`) are built from it; `vl2cli/resolve.py`
turns words into `ReadOptions`/`PageOptions` with the per-task defaults, for the CLI, the server and the library
alike. `PageOptions`: everything that turns files into pages. `ReadOptions`: everything that turns pages into
answers. A bad value is a UsageError naming the option, raised before any model is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vl2cli.errors import UsageError

# 144 DPI: the largest tiling canvas is 1152 px on a side, which a letter page fills at about
# 105 DPI; rendering a little above that gives the bicubic downscale clean strokes to work
# from, and a band cut from the page by --split keeps 144 DPI effective instead of ~105.
DEFAULT_DPI = 144
MAX_DPI = 1200
DEFAULT_MAX_PIXELS = 64_000_000  # per page; larger images are refused as likely decompression bombs
MAX_MAX_PIXELS = 1_000_000_000  # --max-pixels may raise the cap (also above Pillow's own 89 Mpx guard) up to this
DEFAULT_BATCH_SIZE = 4
DEFAULT_MAX_NEW_TOKENS = 2048  # per page; the context (4096) leaves less after a tiled page
DEFAULT_ASK_TOKENS = 512
MAX_BATCH_SIZE = 64
MAX_SPLIT_BANDS = 16
LOOP_RETRY_TEMPERATURES = (0.3, 0.5, 0.7)  # the model card advises temperature <= 0.7
SAMPLING_TOP_P = 0.9  # nucleus sampling whenever the temperature is above 0 (asked for or a loop's retry)
DEFAULT_ROTATE = "auto"  # sideways and upside-down pages are turned upright before reading (vl2cli/orient.py)
ROTATE_CHOICES = ("auto", "off", "0", "90", "180", "270")

OCR_MODE_NAMES = ("tiny", "small", "base", "large", "gundam")  # engine/ocr/config.py OCR_MODES holds their sizes
TextLayer = Literal["off", "hint", "only"]
TEXT_LAYERS: tuple[TextLayer, ...] = ("off", "hint", "only")
Redo = Literal["none", "failed", "all"]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


@dataclass(frozen=True)
class PageOptions:
    pages: str | None = None  # "1-3,7,10-"; None = every page
    dpi: int = DEFAULT_DPI
    password: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    text_layer: bool = False  # also extract PDF text layers
    rotate: str = DEFAULT_ROTATE  # auto (detect), off, or the clockwise turn 0/90/180/270 for every page

    def __post_init__(self) -> None:
        _check(self.rotate in ROTATE_CHOICES, f"--rotate {self.rotate!r}: expected auto, off, 0, 90, 180 or 270")
        _check(isinstance(self.dpi, int) and 18 <= self.dpi <= MAX_DPI, f"--dpi {self.dpi}: expected 18..{MAX_DPI}")
        _check(isinstance(self.max_pixels, int) and 4 <= self.max_pixels <= MAX_MAX_PIXELS,
               f"--max-pixels {self.max_pixels}: expected 4..{MAX_MAX_PIXELS}")


@dataclass(frozen=True)
class ReadOptions:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0  # 0 = greedy
    top_p: float | None = None  # None: 0.9 when sampling, else 1.0
    seed: int | None = None  # None: 0 when sampling (runs repeat), unused when greedy
    text: str | None = None  # the question (ask) or query (ground)
    prompt_file: str | None = None
    split: str = "auto"  # auto | never | N bands
    text_layer: TextLayer = "off"
    batch_size: int = DEFAULT_BATCH_SIZE
    loop_retries: bool = True
    schema_json: str | None = None  # extract: the JSON Schema (compact JSON) every answer must satisfy
    strict: bool | None = None  # answers constrained by the task's grammar; None: the task's default (resolve.py)
    ocr_mode: str = "gundam"  # DeepSeek-OCR: tiny, small, base, large or gundam
    plain: bool = False  # plain text wanted (DeepSeek-OCR then asks "Free OCR." instead of markdown with layout)
    no_repeat: bool = True  # DeepSeek-OCR: no repeated 30-gram within 90 tokens (its own scripts' rule)

    def __post_init__(self) -> None:
        _check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
               f"--max-new-tokens {self.max_new_tokens}: expected a positive number")
        _check(isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
               and 0 <= self.temperature <= 2, f"--temperature {self.temperature}: expected 0..2 (0 = greedy)")
        _check(self.top_p is None or (math.isfinite(self.top_p) and 0 < self.top_p <= 1),
               f"--top-p {self.top_p}: expected a number in (0, 1]")
        _check(isinstance(self.batch_size, int) and 1 <= self.batch_size <= MAX_BATCH_SIZE,
               f"--batch-size {self.batch_size}: expected 1..{MAX_BATCH_SIZE}")
        _check(self.split in ("auto", "never") or (self.split.isdigit() and 1 <= int(self.split) <= MAX_SPLIT_BANDS),
               f"--split {self.split!r}: expected auto, never or a number 1-{MAX_SPLIT_BANDS}")
        _check(self.text_layer in TEXT_LAYERS, f"--text-layer {self.text_layer!r}: expected off, hint or only")
        _check(self.ocr_mode in OCR_MODE_NAMES, f"--ocr-mode {self.ocr_mode!r}: expected {', '.join(OCR_MODE_NAMES)}")

    @property
    def sampling_top_p(self) -> float:
        return self.top_p if self.top_p is not None else (SAMPLING_TOP_P if self.temperature else 1.0)

    @property
    def sampling_seed(self) -> int | None:
        return self.seed if self.seed is not None else (0 if self.temperature else None)

    def settings(self) -> dict:
        """What changes an answer (the page key digests it)."""
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.sampling_top_p,
                "seed": self.sampling_seed, "text": self.text, "split": self.split, "text_layer": self.text_layer,
                "loop_retries": self.loop_retries, "schema": self.schema_json, "strict": bool(self.strict),
                "ocr_mode": self.ocr_mode, "plain": self.plain, "no_repeat": self.no_repeat}


# ---------------------------------------------------------------------- the one table of options

TASK_COMMANDS = ("ocr", "table", "chart", "ground", "caption", "extract")  # `vl2 TASK FILES...`
READING = frozenset((*TASK_COMMANDS, "batch"))  # the commands that read pages through the pipeline
ASKING = frozenset(("ask",))  # one answer about the images together
LOADING = READING | ASKING | {"serve"}  # the commands that load a model


@dataclass(frozen=True)
class Option:
    """One word a user can give, declared once: its keyword (`name`, the same for a Typer parameter, the resolver
    and the library), its type on the command line, its default, its help, its flags, the server's form field."""

    name: str
    type: Any
    default: Any
    help: str | None
    flags: tuple[str, ...] = ()  # "--strict/--no-strict" for an on/off pair
    form: str | None = None  # the server's document endpoint field; None: not a form word
    commands: frozenset[str] = READING  # the commands that take it
    shown: frozenset[str] | None = None  # the commands whose --help shows it (None: all that take it)
    show_default: bool = True
    per_command: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # another "help" or "default"

    def hidden_in(self, command: str) -> bool:
        return self.shown is not None and command not in self.shown

    def help_in(self, command: str) -> str | None:
        return str(self.per_command.get(command, {}).get("help", self.help)) if self.help is not None else None

    def default_in(self, command: str) -> Any:
        return self.per_command.get(command, {}).get("default", self.default)


# The order is the order --help lists them in (after each command's own arguments). A default of None that the
# resolver (vl2cli/resolve.py) fills per task: format (the task's first), strict (the task's), the answer budget
# (ask's is shorter), batch size (the device's free memory on the CLI, the server's --max-batch).
OPTIONS: tuple[Option, ...] = (
    Option("question", str | None, None, "Question (ask) or object (ground).", ("--question",), form="question",
           commands=frozenset(("batch",))),
    Option("model", str, "tiny", "Checkpoint folder, tiny/small/base, ocr (DeepSeek-OCR), or hf:ORG/NAME.",
           ("--model", "-m"), commands=LOADING),
    Option("quant", str, "auto", "auto (nf4 on CUDA, none on CPU), nf4, int8 or none.", ("--quant",),
           commands=LOADING),
    Option("device", str, "auto", "auto, cpu, cuda, cuda:N.", ("--device",), commands=LOADING | {"trace"},
           per_command={"trace": {"default": "cpu"}}),
    Option("dtype", str, "auto", "auto, float32, bfloat16, float16.", ("--dtype",), commands=LOADING | {"trace"},
           per_command={"trace": {"default": "float32"}}),
    Option("max_new_tokens", int, DEFAULT_MAX_NEW_TOKENS, "Answer budget per page.", ("--max-new-tokens",),
           form="max_tokens", commands=READING | ASKING | {"trace"},
           per_command={"trace": {"default": 16}}),  # ask's shorter budget: resolve.task_default
    Option("temperature", float, 0.0, "0 = greedy; the model card advises <= 0.7.", ("--temperature",),
           form="temperature", commands=READING | ASKING),
    Option("prompt_file", str | None, None, "A prompt file to use instead of the task's.", ("--prompt-file",)),
    Option("out", Path | None, None, "Write outputs into this folder (resumable).", ("--out", "-o"),
           commands=frozenset((*TASK_COMMANDS, "ask"))),
    Option("fmt", str | None, None, "Output format: {formats}.", ("--format", "-f"), form="format",
           per_command={"batch": {"help": "Output format per page (the task's first by default)."}}),
    Option("verbose", bool, False, "Model details, tracebacks.", ("--verbose", "-v"),
           commands=LOADING | {"trace"}),
    Option("quiet", bool, False, "Only results and errors.", ("--quiet", "-q"), commands=READING | ASKING),
    Option("json_out", bool, False, "Records as one JSON list on stdout (as -f json); with --out, the run's summary "
           "as JSON.", ("--json",), commands=READING | ASKING,
           per_command={"batch": {"help": "The run's summary as JSON on stdout."},
                        "ask": {"help": "Each answer's record as one JSON line on stdout."}}),
    Option("pages", str | None, None, "Pages to read, e.g. 1-3,7,10-.", ("--pages",), form="pages",
           commands=READING | ASKING),
    Option("dpi", int, DEFAULT_DPI, "PDF render resolution (see README).", ("--dpi",), form="dpi",
           commands=READING | ASKING),
    Option("password", str | None, None, "Password of encrypted PDFs.", ("--password",), form="password",
           commands=READING | ASKING),
    Option("revision", str | None, None, "Pin a hub revision (commit or tag).", ("--revision",),
           commands=LOADING | {"models download"}),
    Option("offline", bool, False, "Never touch the network (also HF_HUB_OFFLINE=1).", ("--offline",),
           commands=LOADING),
    Option("batch_size", int | None, None, "Pages read together (default: what the GPU's free memory holds; 4 on "
           "CPU).", ("--batch-size",)),
    Option("split", str, "auto", "Dense pages: auto, never, or N bands.", ("--split",), form="split"),
    Option("text_layer", str, "off", "Born-digital PDFs: off, hint or only.", ("--text-layer",), form="text_layer"),
    Option("max_pixels", int, DEFAULT_MAX_PIXELS, "Refuse pages above this many pixels.", ("--max-pixels",),
           commands=LOADING),
    Option("redo", str, "none", "With --out: none (resume), failed or all.", ("--redo",)),
    Option("schema", str | None, None, "extract: a JSON Schema file.", ("--schema",), form="schema",
           shown=frozenset(("extract", "batch"))),
    Option("fields", str | None, None, 'extract: shorthand, e.g. "number, total:number, date:date, '
           'items:[{name, qty:integer}]".', ("--fields",), form="fields", shown=frozenset(("extract", "batch"))),
    Option("per", str, "page", "extract: one object per page, or per document (merged).", ("--per",),
           shown=frozenset(("extract", "batch"))),
    Option("strict", bool | None, None, "Constrain answers by a grammar: every box parses (ground, on by default) / "
           "a well-formed markdown table (table, off by default).", ("--strict/--no-strict",), form="strict",
           shown=frozenset(("ground", "table", "batch")), show_default=False,
           per_command={"batch": {"help": "Grammar-constrained answers: ground (default on), table (default off)."}}),
    Option("ocr_mode", str, "gundam", "DeepSeek-OCR (--model ocr): tiny, small, base, large or gundam (640-pixel "
           "tiles + a 1024 view; documents).", ("--ocr-mode",), form="ocr_mode", commands=READING | ASKING),
    Option("no_repeat", bool, True, "DeepSeek-OCR: ban a repeated 30-gram within 90 tokens (<td> exempt).",
           ("--no-repeat-ngrams/--allow-repeat-ngrams",)),
    Option("rotate", str, DEFAULT_ROTATE, "Turn pages upright before reading: auto (from the PDF text layer, else "
           "Tesseract), off, or 0/90/180/270 (clockwise, every page).", ("--rotate",), form="rotate",
           commands=READING | ASKING),
    Option("keep_furniture", bool, False, "ocr: keep page headers, footers and page numbers in the markdown/text "
           "(the record labels them either way).", ("--keep-furniture",), shown=frozenset(("ocr", "batch"))),
)
OPTION = {o.name: o for o in OPTIONS}
FORM_FIELDS = {o.form: o for o in OPTIONS if o.form}  # the server's document endpoint: field -> option


def options_of(command: str) -> tuple[Option, ...]:
    """The options `command` takes, in the table's order."""
    return tuple(o for o in OPTIONS if command in o.commands)
