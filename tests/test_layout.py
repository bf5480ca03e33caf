"""The package's structure: files as rooms, imports as arrows. At most 7 floors, no circles, no upward imports;
the library face in vl2cli/__init__.py; the README's Python example runs as written."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from tests.helpers import IMG, TINY

PACKAGE = Path(__file__).parent.parent / "vl2cli"
README = Path(__file__).parent.parent / "README.md"
MAX_FLOORS = 7


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.AST) -> set[str]:
    """Every vl2cli import, at module level or inside functions, except those under `if TYPE_CHECKING:`
    (type hints only: no arrow at run time)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vl2cli"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("vl2cli"))
        for child in ast.iter_child_nodes(node):
            visit(child)
    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = {t for t in _runtime_imports(ast.parse(path.read_text())) if t in modules}
        graph[name] = {t for t in targets if t != name and not (modules[t].name == "__init__.py"
                                                                and t != "vl2cli")} - {"vl2cli"}
    return graph


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """1 for a module that imports no other; else one above the highest module it imports."""
    level: dict[str, int] = {}
    visiting: set[str] = set()

    def walk(name: str, path: tuple[str, ...]) -> int:
        if name in level:
            return level[name]
        if name in visiting:
            raise AssertionError("import circle: " + " -> ".join((*path, name)))
        visiting.add(name)
        level[name] = 1 + max((walk(t, (*path, name)) for t in graph[name]), default=0)
        visiting.discard(name)
        return level[name]
    for name in graph:
        walk(name, ())
    return level


def test_the_package_has_at_most_seven_floors_and_no_circles():
    graph = import_graph()
    level = floors(graph)
    drawing = "\n".join(f"{f}: {', '.join(sorted(n for n, x in level.items() if x == f))}"
                        for f in range(max(level.values()), 0, -1))
    assert max(level.values()) <= MAX_FLOORS, drawing
    assert level["vl2cli.cli"] == max(level.values())  # the CLI is the top: nothing imports it
    assert not any("vl2cli.cli" in targets for targets in graph.values())
    leaves = {"vl2cli.errors", "vl2cli.writers"}  # utilities with no application logic
    for name, targets in graph.items():  # the engine never reaches up into the application
        if name.startswith("vl2cli.engine."):
            assert all(t.startswith("vl2cli.engine.") or t in leaves for t in targets), (name, targets)


def test_the_library_face_has_what_the_readme_promises():
    """Each name the face exports is the object its home module defines (a lazy name resolving elsewhere would not
    be what the README's example and the type hints promise)."""
    import vl2cli
    from vl2cli.errors import Vl2Error
    from vl2cli.options import PageOptions, ReadOptions
    from vl2cli.reader import Reader
    from vl2cli.results import AskResult, PageResult
    from vl2cli.tasks import get_task
    homes = {"Reader": Reader, "PageResult": PageResult, "AskResult": AskResult, "ReadOptions": ReadOptions,
             "PageOptions": PageOptions, "get_task": get_task, "Vl2Error": Vl2Error}
    assert set(vl2cli.__all__) == {*homes, "load", "read", "__version__"}
    for name, thing in homes.items():
        assert getattr(vl2cli, name) is thing, name
    assert callable(vl2cli.load) and callable(vl2cli.read) and isinstance(vl2cli.__version__, str)
    with pytest.raises(AttributeError, match="no attribute 'Engine'"):
        vl2cli.Engine  # noqa: B018 - only the face's names resolve


def test_the_readme_python_example_runs_as_written(monkeypatch):
    import vl2cli
    text = README.read_text()
    example = re.search(r"## Python API\n.*?```python\n(.*?)```", text, re.S)
    assert example, "README has no Python API example"
    code = example.group(1).replace('"tiny"', repr(TINY)).replace('"samples/report.pdf"', repr(IMG))
    code = code.replace('pages="2"', "pages=None")
    printed: list = []
    monkeypatch.setattr("builtins.print", lambda *args, **kwargs: printed.append(args))
    returned: list = []
    read = vl2cli.read

    def recorded(*args, **kwargs):
        returned.extend(read(*args, **kwargs))
        return returned
    monkeypatch.setattr(vl2cli, "read", recorded)
    exec(compile(code, "README.md", "exec"), {})  # the README's own example, on the tiny checkpoint
    [result] = returned
    assert (result.source, result.page, result.task, result.status) == (IMG, 1, "table", "ok")
    assert isinstance(result.fields["tables"], list) and result.generated_tokens > 0
    assert printed == [(result.status, result.fields["tables"])]


def _timeless(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "seconds"}


def test_read_gives_the_records_the_cli_prints_with_the_options_it_was_given(reader):
    """`vl2cli.read` on the tiny checkpoint: the pages, task, question and options asked for, and records equal to
    what `vl2 TASK ... --json` prints for the same request (one pipeline, the same defaults)."""
    import vl2cli
    from tests.helpers import SAMPLES, vl2
    report = str(SAMPLES / "report.pdf")
    [page] = vl2cli.read(reader, [report], task="ocr", pages="2",
                         options=vl2cli.ReadOptions(max_new_tokens=6, split="never"))
    assert (page.source, page.page, page.task, page.status) == (report, 2, "ocr", "ok")
    assert page.generated_tokens == 6 and page.finish_reason == "length" and (page.width, page.height) == (1224, 1584)
    cli = vl2("ocr", report, "--pages", "2", "--split", "never", "--json", tokens=6)
    assert cli.exit_code == 0, cli.output
    assert [_timeless(page.to_json())] == [_timeless(r) for r in json.loads(cli.stdout)]

    [found] = vl2cli.read(reader, [IMG], task="ground", question="the total", options=vl2cli.ReadOptions(max_new_tokens=60))
    assert found.question == "the total" and found.grammar is not None  # vl2 ground's grammar
    cli = vl2("ground", IMG, "the total", "--json", tokens=60)
    assert [_timeless(found.to_json())] == [_timeless(r) for r in json.loads(cli.stdout)]

    letter = str(SAMPLES / "letter.pdf")  # born-digital: its text layer is the answer, at the DPI asked for
    [text] = vl2cli.read(reader, [letter], options=vl2cli.ReadOptions(text_layer="only"),
                         page_options=vl2cli.PageOptions(dpi=36))
    assert (text.width, text.height) == (306, 396) and text.finish_reason == "text_layer"
    assert text.answer.splitlines() == ["Dear archivist,", "the 1932 ledgers are scanned.", "Kind regards, The Records Office"]


@pytest.mark.parametrize("path", ["vl2cli/prompts/ocr.txt", "vl2cli/schemas/page-record.schema.json"])
def test_package_data_is_found_through_importlib_resources(path):
    from importlib.resources import files
    package, _, name = path.rpartition("/")
    assert files(package.replace("/", ".")).joinpath(name).is_file()


@pytest.mark.slow
def test_the_readme_openai_example_runs_as_written_against_any_checkpoint(monkeypatch):
    """The README's openai example reads the model id from /v1/models, so it works whatever checkpoint is served
    (a local folder's id is its name, not the hub id)."""
    from tests.helpers import running_server
    from vl2cli.engine.loading import load_model
    from vl2cli.reader import Reader
    example = re.search(r"The `openai` client:\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert example, "README has no openai example"
    reader = Reader(load_model(TINY, device="cpu", dtype="float32", quant="none"))
    printed: list = []
    monkeypatch.setattr("builtins.print", lambda *args, **kwargs: printed.append(args))
    with running_server(reader) as (url, _server):
        code = example.group(1).replace("http://127.0.0.1:8000", url).replace("max_tokens=300", "max_tokens=100")
        code = code.replace('"samples/invoice.png"', repr(IMG))
        exec(compile(code, "README.md", "exec"), {})
    assert printed
