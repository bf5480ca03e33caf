"""The options, declared once: the table (vl2cli/options.py) is what the Typer commands take and the server's
document form accepts, and one resolver (vl2cli/resolve.py) gives the CLI, the server and the library the same
options for the same words. Several of these failed on the defaults that had drifted apart."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers import IMG, TINY, vl2
from vl2cli.options import OPTION, OPTIONS, TASK_COMMANDS, PageOptions, ReadOptions, options_of

OWN = {  # each command's own parameters; every other parameter it takes comes from the table
    **{name: {"inputs"} for name in TASK_COMMANDS},
    "batch": {"inputs", "out", "task", "glob", "ray", "workers", "gpus_per_worker"},
    "ask": {"inputs", "chat"},
    "serve": {"host", "port", "api_key", "allow_remote_images", "max_batch", "max_queue", "max_upload_mb",
              "max_images", "max_pages", "drain_seconds", "log_level", "allowed_origins", "max_tokens_policy"},
    "trace": {"model", "prompt", "out", "image", "all_positions", "ocr_mode"},
    "models download": {"name"},
}


def _click_commands() -> dict[str, object]:
    import typer.main

    from vl2cli.cli import app
    root = typer.main.get_command(app)
    commands = dict(root.commands)  # type: ignore[attr-defined]
    commands["models download"] = commands["models"].commands["download"]  # type: ignore[attr-defined]
    return commands


@pytest.mark.parametrize("command", sorted(OWN))
def test_each_command_takes_exactly_its_own_parameters_and_the_tables_options(command):
    params = {p.name: p for p in _click_commands()[command].params}  # type: ignore[attr-defined]
    assert set(params) - OWN[command] == {o.name for o in options_of(command)}
    for option in options_of(command):
        param = params[option.name]
        flags = [f for spelling in option.flags for f in spelling.split("/")]
        assert [*param.opts, *param.secondary_opts] == flags, option.name
        assert param.hidden == option.hidden_in(command), option.name
        if not param.hidden and "{" not in (option.help or ""):
            assert param.help == option.help_in(command), option.name


def test_the_per_task_defaults_show_in_help_as_the_resolver_applies_them():
    from vl2cli.resolve import task_default
    from vl2cli.tasks import get_task
    commands = _click_commands()
    for name in TASK_COMMANDS:
        params = {p.name: p for p in commands[name].params}  # type: ignore[attr-defined]
        assert params["fmt"].default == task_default("fmt", get_task(name)) == get_task(name).formats[0]
        assert params["max_new_tokens"].default == task_default("max_new_tokens", get_task(name)) == 2048
    ask = {p.name: p for p in commands["ask"].params}  # type: ignore[attr-defined]
    assert ask["max_new_tokens"].default == task_default("max_new_tokens", get_task("ask"), asking=True) == 512


def test_the_option_objects_defaults_are_the_tables():
    from vl2cli.resolve import PAGE_FIELDS
    for cls, names in ((ReadOptions, {f.name for f in dataclasses.fields(ReadOptions)}), (PageOptions, PAGE_FIELDS)):
        for field in dataclasses.fields(cls):
            if field.name in names & set(OPTION) and OPTION[field.name].default is not None:
                assert field.default == OPTION[field.name].default, (cls.__name__, field.name)


def test_the_servers_form_fields_are_the_tables():
    pytest.importorskip("fastapi")
    from vl2cli.serve.app import DOCUMENT_FIELDS
    assert DOCUMENT_FIELDS == {o.form for o in OPTIONS if o.form}
    assert {"max_tokens", "format", "question", "strict"} <= DOCUMENT_FIELDS


class _Captured(Exception):
    pass


def _library_job(monkeypatch, **kwargs):
    """The Job `vl2cli.read` runs (the pipeline is stopped there: no model is needed)."""
    import vl2cli
    import vl2cli.pipeline as pipeline
    jobs = []

    def capture(_reader, job, _sources, _sink):
        jobs.append(job)
        raise _Captured
    monkeypatch.setattr(pipeline, "read_documents", capture)
    reader = SimpleNamespace(family="vl2", loaded=SimpleNamespace(folder=Path(TINY)))
    with pytest.raises(_Captured):
        vl2cli.read(reader, [IMG], **kwargs)  # type: ignore[arg-type]
    return jobs[0]


def test_the_library_grounds_with_the_grammar_as_vl2_ground_does(monkeypatch):
    """`vl2cli.read(..., task="ground")` once read without the grounding grammar that `vl2 ground` uses."""
    assert _library_job(monkeypatch, task="ground", question="the red circle").read.strict is True
    own = _library_job(monkeypatch, task="ground", question="x", options=ReadOptions(max_new_tokens=300))
    assert own.read.strict is True and own.read.max_new_tokens == 300 and own.read.text == "x"
    assert _library_job(monkeypatch, task="ground", question="x", options=ReadOptions(strict=False)).read.strict is False
    assert _library_job(monkeypatch, task="table").read.strict is False


def test_the_text_layer_survives_when_both_option_objects_are_given(monkeypatch):
    """Given both objects, `PageOptions.text_layer` was taken from the PageOptions (off by default) and the reading's
    "only" found no text layer to read."""
    job = _library_job(monkeypatch, options=ReadOptions(text_layer="only"), page_options=PageOptions(dpi=100))
    assert job.pages.text_layer is True and job.pages.dpi == 100 and job.read.text_layer == "only"
    assert _library_job(monkeypatch, options=ReadOptions(), page_options=PageOptions(text_layer=True)).pages.text_layer \
        is False  # the reading decides: no text layer is extracted for a reading that never uses it
    assert _library_job(monkeypatch, pages="1", page_options=PageOptions(dpi=100)).pages.pages == "1"


def _cli_job(monkeypatch, *args: str):
    """The Job the CLI plans its pages with (stopped there: no model loads)."""
    import vl2cli.pipeline as pipeline
    jobs = []

    def capture(job, *_rest):
        jobs.append(job)
        return []
    monkeypatch.setattr(pipeline, "plan_work", capture)
    result = vl2(*args, tokens=None)
    assert result.exit_code == 0, result.output
    return jobs[0]


def _server_options(task: str, words: dict[str, str]):
    from vl2cli.serve.app import ServeSettings, _document_options
    server = SimpleNamespace(settings=ServeSettings("tiny"), reader=SimpleNamespace(check_mode=lambda mode: None))
    return _document_options(server, task, words)  # type: ignore[arg-type]


@pytest.mark.parametrize("task,query,flags,form", [
    ("ground", "the red circle", ["--max-new-tokens", "100", "--temperature", "0.5", "--dpi", "100", "--pages", "1",
                                  "--split", "never", "--text-layer", "hint", "--ocr-mode", "base", "--rotate", "off",
                                  "-f", "text"],
     {"question": "the red circle", "max_tokens": "100", "temperature": "0.5", "dpi": "100", "pages": "1",
      "split": "never", "text_layer": "hint", "ocr_mode": "base", "rotate": "off", "format": "text"}),
    ("ground", "a box", ["--no-strict", "-f", "json"], {"question": "a box", "strict": "false"}),
    ("table", None, ["--strict", "-f", "json"], {"strict": "true"}),
    ("extract", None, ["--fields", "number, total:number", "-f", "json"], {"fields": "number, total:number"}),
    ("ocr", None, ["-f", "json", "--text-layer", "only"], {"text_layer": "only"}),
])
def test_the_cli_and_the_servers_document_endpoint_resolve_the_same_options(monkeypatch, task, query, flags, form):
    pytest.importorskip("fastapi")
    job = _cli_job(monkeypatch, task, IMG, *([query] if query else []), *flags)
    _, read, pages = _server_options(task, form)
    # the batch size is the one difference: the CLI sizes it from the device, the server takes its --max-batch
    assert dataclasses.replace(job.read, batch_size=1) == dataclasses.replace(read, batch_size=1)
    assert job.pages == pages
    assert read.strict is ((task == "ground" and form.get("strict") != "false") or task == "table")


def test_ask_has_its_shorter_budget_and_a_page_read_with_a_question_the_pages():
    from vl2cli.resolve import resolve_options
    assert resolve_options("ask", {"question": "why?"}, asking=True).read.max_new_tokens == 512
    assert resolve_options("ask", {"question": "why?"}).read.max_new_tokens == 2048  # batch --task ask, a page each


def test_unknown_words_are_a_callers_bug_and_bad_values_name_their_flag():
    from vl2cli.errors import UsageError
    from vl2cli.resolve import resolve_options
    with pytest.raises(TypeError, match="unknown option"):
        resolve_options("ocr", {"dpii": 100})
    with pytest.raises(UsageError, match=r"--dpi 1: expected 18\.\.1200"):
        resolve_options("ocr", {"dpi": 1})
    with pytest.raises(UsageError, match="extract: give either --schema FILE or --fields SPEC"):
        resolve_options("extract", {})


def test_sampling_uses_one_top_p():
    from vl2cli.options import SAMPLING_TOP_P
    assert ReadOptions(temperature=0.5).sampling_top_p == SAMPLING_TOP_P and ReadOptions().sampling_top_p == 1.0
    reader_source = (Path(__file__).parent.parent / "vl2cli" / "reader.py").read_text()
    assert "0.9" not in reader_source  # the loop retries sample with the same constant


def test_the_cli_reaches_the_engine_only_through_the_library_face():
    """The CLI parses, calls the library and prints: model choice, loading, traces and the variants table are behind
    `vl2cli` (vl2cli/__init__.py), and no CLI-side module imports the engine."""
    from tests.test_layout import import_graph
    graph = import_graph()
    for module in ("vl2cli.cli", "vl2cli.run", "vl2cli.terminal", "vl2cli.signals", "vl2cli.flags"):
        assert not [t for t in graph[module] if t.startswith("vl2cli.engine")], module


def test_the_ocr_mode_names_are_deepseek_ocrs_modes():
    """options.py names the modes without importing the engine; engine/ocr/config.py holds their sizes: one list."""
    from vl2cli.engine.ocr.config import OCR_MODES
    from vl2cli.options import OCR_MODE_NAMES
    assert OCR_MODE_NAMES == tuple(OCR_MODES)
