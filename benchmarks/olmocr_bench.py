"""olmOCR-bench with vl2: convert a bench folder's PDFs into its candidate layout, score them with olmOCR-bench's own
scorer (the `olmocr` package's `olmocr.bench`), and report per category.

    python benchmarks/olmocr_bench.py BENCH_DIR --candidate vl2 -- --model ocr          # a real model (GPU)
    python benchmarks/olmocr_bench.py BENCH_DIR --candidate vl2_text -- --text-layer only --model DIR
    python benchmarks/olmocr_bench.py BENCH_DIR --candidate pdftotext --pdftotext       # poppler's pdftotext

BENCH_DIR is in olmOCR-bench's layout: `pdfs/**.pdf` and `*.jsonl` test files (the full set is the Hugging Face
dataset allenai/olmOCR-bench, folder bench_data/; benchmarks/olmocr_bench_sample/ is the public sample of the
allenai/olmocr repository). Every word after `--` goes to `vl2 batch --task ocr` as it is. Candidates are written
to BENCH_DIR/<candidate>/<pdf path without .pdf>_pg<N>_repeat1.md, the layout olmOCR-bench reads; the scores go to
stdout as JSON: per category (per test file, as olmOCR-bench averages them) and per test type.

Needs `pip install olmocr --no-deps` plus its scorer's imports (pypdf, tqdm, beautifulsoup4, fuzzysearch, rapidfuzz,
playwright); the math tests render equations with Playwright's Chromium, or the system's `chromium` where Playwright
has no browser of its own (VL2_BENCH_CHROMIUM names another). With `--text-layer only`, a page that has no text
layer is read by the model; `--text-layer-only-strict` writes an empty candidate for it instead (what the text
layer alone gives), and the report counts such pages.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def pdf_pages(pdf: Path) -> int:
    import pypdfium2 as pdfium
    doc = pdfium.PdfDocument(str(pdf))
    try:
        return len(doc)
    finally:
        doc.close()


def candidate_path(candidate: Path, rel_pdf: str, page: int) -> Path:
    return candidate / f"{rel_pdf[:-4]}_pg{page}_repeat1.md"


def convert_with_vl2(bench: Path, candidate: Path, vl2_args: list[str], strict_text_layer: bool = False) -> dict:
    """`vl2 batch` over BENCH_DIR/pdfs into a work folder, then each page's markdown (the files vl2 writes, furniture
    settled across the document) copied into the candidate layout."""
    pdfs = (bench / "pdfs").resolve()
    with tempfile.TemporaryDirectory(prefix="vl2-olmocr-bench-") as work:
        command = [sys.executable, "-m", "vl2cli.cli", "batch", str(pdfs), "--task", "ocr", "-f", "markdown",
                   "--out", work, "--json", "--quiet", *vl2_args]
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode not in (0, 1):  # 1: some pages failed; they are scored as missing
            raise SystemExit(f"vl2 failed ({run.returncode}): {run.stderr.strip()[-2000:]}")
        pages = no_text_layer = 0
        for line in (Path(work) / "index.jsonl").read_text().splitlines():
            entry = json.loads(line)
            md = next((o for o in entry["outputs"] if o.endswith(".ocr.md")), None)
            if entry["status"] != "ok" or md is None:
                continue
            record = json.loads((Path(work) / md.replace(".ocr.md", ".ocr.json")).read_text())
            rel = str(Path(entry["source"]).resolve().relative_to(pdfs))
            text = (Path(work) / md).read_text()
            if record["finish_reason"] != "text_layer" and "--text-layer" in vl2_args:
                no_text_layer += 1
                if strict_text_layer:
                    text = ""
            target = candidate_path(candidate, rel, entry["page"])
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            pages += 1
    return {"pages": pages, "pages_without_text_layer": no_text_layer, "vl2_summary": json.loads(run.stdout or "{}")}


def convert_with_pdftotext(bench: Path, candidate: Path, layout: bool = False) -> dict:
    """Poppler's pdftotext, one page at a time (its default reading order, or -layout)."""
    pages = 0
    for pdf in sorted((bench / "pdfs").rglob("*.pdf")):
        rel = str(pdf.relative_to(bench / "pdfs"))
        for page in range(1, pdf_pages(pdf) + 1):
            args = ["pdftotext", "-f", str(page), "-l", str(page), *(["-layout"] if layout else []), str(pdf), "-"]
            text = subprocess.run(args, capture_output=True, text=True, check=True).stdout
            target = candidate_path(candidate, rel, page)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            pages += 1
    return {"pages": pages}


def use_system_chromium() -> None:
    """olmocr.bench renders equations with Playwright's Chromium; where Playwright has none downloaded, launch the
    system's (Debian's chromium) instead. Only the browser's path changes, never the scorer."""
    from playwright.sync_api import BrowserType
    executable = os.environ.get("VL2_BENCH_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        return
    launch = BrowserType.launch

    def launch_system(self: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("executable_path", executable)
        return launch(self, *args, **kwargs)
    BrowserType.launch = launch_system  # type: ignore[method-assign]


def score(bench: Path, candidate: Path) -> dict:
    """olmOCR-bench's evaluation of one candidate, grouped as its own report groups it: per test file (the
    categories; the overall score is their mean) and per test type. Tests are loaded as its main() loads them,
    with a baseline test added for every PDF that has none."""
    use_system_chromium()
    from olmocr.bench.benchmark import evaluate_candidate
    from olmocr.bench.tests import BaselineTest, load_tests
    pdf_names = sorted(str(p.relative_to(bench / "pdfs")) for p in (bench / "pdfs").rglob("*.pdf"))
    tests, category = [], {}
    for jsonl in sorted(bench.glob("*.jsonl")):
        for test in load_tests(str(jsonl)):
            tests.append(test)
            category[test.id] = jsonl.stem
    for pdf in pdf_names:
        if not any(t.type == "baseline" and t.pdf == pdf for t in tests):
            tests.append(BaselineTest(id=f"{pdf}_baseline", pdf=pdf, page=1, type="baseline"))
            category[tests[-1].id] = "baseline"
    _, total, errors, _, _, _, results = evaluate_candidate(str(candidate), tests, pdf_names)
    passed = {t.id: ok for pages in results.values() for outcomes in pages.values() for t, ok, _ in outcomes}
    by_category: dict[str, list[bool]] = {}
    by_type: dict[str, list[bool]] = {}
    for test in tests:
        ok = passed.get(test.id, False)
        by_category.setdefault(category[test.id], []).append(ok)
        by_type.setdefault(test.type, []).append(ok)

    def table(groups: dict[str, list[bool]]) -> dict[str, dict[str, float]]:
        return {k: {"passed": sum(v), "tests": len(v), "score": round(100 * sum(v) / len(v), 1)}
                for k, v in sorted(groups.items())}
    categories = table(by_category)
    overall = sum(c["score"] for c in categories.values()) / len(categories) if categories else 0.0
    return {"candidate": candidate.name, "overall": round(overall, 1), "tests": total, "categories": categories,
            "test_types": table(by_type), "errors": errors[:20]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    vl2_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench", type=Path, help="olmOCR-bench folder: pdfs/ and *.jsonl")
    parser.add_argument("--candidate", default="vl2", help="the candidate folder's name under BENCH_DIR")
    parser.add_argument("--pdftotext", action="store_true", help="convert with poppler's pdftotext instead of vl2")
    parser.add_argument("--layout", action="store_true", help="pdftotext -layout")
    parser.add_argument("--text-layer-only-strict", action="store_true",
                        help="with --text-layer only: a page without a text layer gets an empty candidate")
    parser.add_argument("--score-only", action="store_true", help="score the existing candidate folder")
    args = parser.parse_args(own)
    bench = args.bench
    if not (bench / "pdfs").is_dir() or not list(bench.glob("*.jsonl")):
        parser.error(f"{bench}: expected olmOCR-bench's layout (pdfs/ and *.jsonl)")
    candidate = bench / args.candidate
    conversion: dict = {}
    if not args.score_only:
        if candidate.exists():
            shutil.rmtree(candidate)
        conversion = (convert_with_pdftotext(bench, candidate, args.layout) if args.pdftotext
                      else convert_with_vl2(bench, candidate, vl2_args, args.text_layer_only_strict))
    with contextlib.redirect_stdout(sys.stderr):  # olmocr.bench prints its progress to stdout: the report owns it
        scores = score(bench, candidate)
    report = {**scores, "conversion": conversion,
              "command": " ".join(["python", "benchmarks/olmocr_bench.py", *argv])}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
