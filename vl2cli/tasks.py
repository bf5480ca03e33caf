"""Tasks: a prompt from prompts/, a parser of the model's answer, and the renderings a user can ask for."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from vl2cli.errors import UsageError
from vl2cli.parsers import (
    parse_grounding,
    parse_tables,
    strip_grounding_tags,
    table_to_csv,
    table_to_html,
    table_to_markdown,
)


def _prompts_dir() -> Path:
    """prompts/ beside the package in a source checkout, else where the wheel installs it (share/vl2/prompts)."""
    import sys
    for folder in (Path(__file__).resolve().parent.parent / "prompts", Path(sys.prefix) / "share" / "vl2" / "prompts"):
        if folder.is_dir():
            return folder
    return Path(__file__).resolve().parent.parent / "prompts"


PROMPTS_DIR = _prompts_dir()


def load_prompt(name_or_path: str) -> str:
    """A prompt by task name (prompts/NAME.txt) or from a file; '#' lines are comments."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROMPTS_DIR / f"{name_or_path}.txt"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read prompt ({exc.strerror or exc})") from None
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    prompt = "\n".join(lines).strip()
    if not prompt:
        raise UsageError(f"{path}: the prompt file is empty")
    return prompt


def image_marks(n: int) -> str:
    """One image: '<image>\\n'; several: 'This is image_1: <image>\\n...' as the official multi-image examples."""
    if n == 1:
        return "<image>\n"
    return "".join(f"This is image_{i}: <image>\n" for i in range(1, n + 1))


@dataclass
class Task:
    name: str
    prompt_file: str
    formats: tuple[str, ...] = ("markdown", "text", "json", "jsonl")
    splittable: bool = False  # dense pages may be read in bands and merged
    needs_text: str | None = None  # "question" or "query": the user's words fill the prompt

    def prompt(self, n_images: int, text: str | None = None, prompt_file: str | None = None) -> str:
        template = load_prompt(prompt_file or self.prompt_file)
        if self.needs_text and not (text or "").strip():
            raise UsageError(f"{self.name}: a {self.needs_text} is required")
        body = template.replace("{question}", (text or "").strip()).replace("{query}", (text or "").strip())
        return image_marks(n_images) + body

    def parse(self, answer: str, width: int, height: int, text: str | None = None) -> dict:
        return {}

    def render(self, record: dict, fmt: str) -> str:
        if fmt == "json":
            return json.dumps(record, ensure_ascii=False, indent=1)
        if fmt == "jsonl":
            return json.dumps(record, ensure_ascii=False)
        if fmt == "text":
            return strip_markdown(record["answer"])
        return record["answer"]

    def extension(self, fmt: str) -> str:
        return {"markdown": ".md", "text": ".txt", "json": ".json", "jsonl": ".jsonl",
                "csv": ".csv", "html": ".html"}[fmt]


def strip_markdown(text: str) -> str:
    import re
    text = re.sub(r"^#{1,6}\s*", "", text, flags=re.M)
    text = re.sub(r"(\*\*|__)(.*?)\1", r"\2", text)
    return text


class TableTask(Task):
    def parse(self, answer, width, height, text=None):
        return {"tables": parse_tables(answer)}

    def render(self, record, fmt):
        tables = record.get("tables") or []
        if fmt == "csv":
            return "\n".join(table_to_csv(t) for t in tables)
        if fmt == "html":
            return "\n".join(table_to_html(t) for t in tables)
        if fmt == "markdown":
            return "\n\n".join(table_to_markdown(t) for t in tables) if tables else record["answer"]
        return super().render(record, fmt)


class ChartTask(Task):
    def parse(self, answer, width, height, text=None):
        tables = parse_tables(answer)
        description = answer
        if tables:  # the description is what precedes the first table row
            description = "\n".join(line for line in answer.splitlines() if "|" not in line and "<t" not in line)
        return {"description": description.strip(), "data": tables[0] if tables else None}


class GroundTask(Task):
    def parse(self, answer, width, height, text=None):
        objects = parse_grounding(answer, width, height, default_label=(text or "").strip())
        return {"objects": objects, "caption": strip_grounding_tags(answer)}

    def render(self, record, fmt):
        if fmt in ("markdown", "text"):
            lines = [f"{o['label'] or '?'}: {o['box']} (normalised {o['box_norm']})" for o in record["objects"]]
            caption = record.get("caption", "")
            return "\n".join(([caption] if caption and record.get("mode") == "caption" else []) + lines) \
                or "(no boxes in the answer)"
        return super().render(record, fmt)


def annotate(image: Image.Image, objects: list[dict]) -> Image.Image:
    """The page with each box drawn and labelled."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    palette = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]
    width = max(2, round(min(out.size) / 300))
    for i, obj in enumerate(objects):
        color = palette[i % len(palette)]
        x1, y1, x2, y2 = obj["box"]
        draw.rectangle([x1, y1, max(x1, x2), max(y1, y2)], outline=color, width=width)
        if obj.get("label"):
            draw.text((x1 + width, max(0, y1 - 12)), obj["label"][:60], fill=color)
    return out


TASKS: dict[str, Task] = {
    "ocr": Task("ocr", "ocr", splittable=True),
    "ask": Task("ask", "ask", needs_text="question"),
    "table": TableTask("table", "table", formats=("json", "jsonl", "csv", "markdown", "html")),
    "chart": ChartTask("chart", "chart"),
    "ground": GroundTask("ground", "ground", needs_text="query"),
    "caption": GroundTask("caption", "caption"),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}: expected one of {', '.join(TASKS)}")
    return TASKS[name]
