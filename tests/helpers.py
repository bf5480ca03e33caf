"""What tests share: paths to the tiny checkpoints, a checkpoint builder, the CLI runner, schema checks."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from testkit import INIT_STD, random_model
from typer.testing import CliRunner

from vl2cli.cli import app
from vl2cli.engine.names import model_to_checkpoint_name
from vl2cli.engine.vl2.config import load_config
from vl2cli.errors import InputError
from vl2cli.options import PageOptions
from vl2cli.pages import Page, plan_source, render_pages

DATA = Path(__file__).parent / "data"
PARITY = DATA / "parity"
CKPT = PARITY / "ckpt"
TINY = str(CKPT / "tiny")
IMG = str(PARITY / "images" / "note_300x200.png")
PAGE_IMG = str(PARITY / "images" / "page_1000x700.png")
SAMPLES = Path(__file__).parent.parent / "samples"


def make_checkpoint(folder: Path, base: str = "tiny", seed: int = 0, language: dict | None = None,
                    extra_tensors: dict | None = None, drop: tuple[str, ...] = (), std: float = INIT_STD) -> Path:
    """A random-weight checkpoint in the official layout, from a parity checkpoint's config plus overrides."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in (CKPT / base).iterdir():
        if f.suffix == ".json":
            shutil.copy(f, folder / f.name)
    raw = json.loads((folder / "config.json").read_text())
    raw["language_config"].update(language or {})
    (folder / "config.json").write_text(json.dumps(raw, indent=1))
    cfg = load_config(folder)
    model = random_model(cfg, seed=seed, std=std)
    tensors = {model_to_checkpoint_name(k): v.contiguous() for k, v in model.state_dict().items()}
    tensors["vision.attn_pool.latent"] = torch.zeros(1, 1, cfg.vision.width)
    tensors.update(extra_tensors or {})
    for name in drop:
        tensors.pop(name)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def file_pages(path: str, opts: PageOptions | None = None) -> Iterator[Page]:
    """Every requested page of one file as the pipeline gets them (planned, then rendered one at a time); InputError
    when the file cannot be read at all."""
    opts = opts or PageOptions()
    source = plan_source(path, opts)
    if source.error:
        raise InputError(source.error)
    yield from render_pages(source, opts)


_runner = CliRunner()


def vl2(*args: str, model: str | None = TINY, tokens: int | None = 12, stdin: bytes | str | None = None):
    """Run `vl2 ARGS` in-process (through the CLI's error boundary) with the tiny checkpoint and a short budget."""
    extra = (["--model", model] if model else []) + (["--max-new-tokens", str(tokens)] if tokens else [])
    return _runner.invoke(app, [*args, *extra], input=stdin)


def assert_valid_record(record: dict, kind: str = "page") -> None:
    """Every record vl2 prints or writes must validate against the published JSON Schema."""
    import jsonschema

    from vl2cli.results import load_schema
    jsonschema.validate(record, load_schema(kind))


def index_entries(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines() if line.strip()]


def running_server(reader, host: str = "127.0.0.1", **settings):
    """A real uvicorn server on `host` (a free port) in a thread, serving `reader`; yields (base URL, Server)."""
    from vl2cli.serve.app import ServeSettings, serve_in_thread
    return serve_in_thread(reader, ServeSettings("tiny", ("vl2-tiny",), **settings), host=host)
