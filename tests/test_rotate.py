"""Pages turned upright before they are read (vl2cli/orient.py): detection from a PDF's text layer and from the real
Tesseract's OSD, the turn, and everything a record says (size, boxes, figure crops, annotated pages) mapped back to
the page as given. `.ci/run` installs Tesseract and sets VL2_REQUIRE_TESSERACT: there a missing one fails."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from tests.helpers import IMG, assert_valid_record, file_pages, vl2
from vl2cli import orient
from vl2cli.options import PageOptions
from vl2cli.orient import Orientation, box_as_given, fields_as_given, turn

FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf")  # Debian fonts-dejavu-core
REAL_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "real-images"  # CI lays shared/ beside the clone
WORDS = ("the invoice total amount was paid on time and the report lists every payment made during the period "
         "under review with its date reference number and the name of the customer who received the goods").split()


@pytest.fixture(scope="module")
def tesseract():
    if shutil.which("tesseract") is None:
        if os.environ.get("VL2_REQUIRE_TESSERACT"):  # .ci/run installs it: there, a missing one fails
            pytest.fail("tesseract is required (apt-get install tesseract-ocr)")
        pytest.skip("tesseract is not installed (apt-get install tesseract-ocr)")
    if not FONT.is_file():
        pytest.fail(f"{FONT} is required (apt-get install fonts-dejavu-core)")


def text_page(size: int, lines: int, seed: int = 0) -> Image.Image:
    """An upright letter page at 144 DPI set in DejaVu Serif at `size` px, `lines` lines of words."""
    import random
    rng = random.Random(seed)
    page = Image.new("RGB", (1224, 1584), "white")
    draw = ImageDraw.Draw(page)
    font = ImageFont.truetype(str(FONT), size)
    for i in range(lines):
        text = " ".join(rng.choice(WORDS) for _ in range(60))
        while draw.textlength(text, font=font) > 1024:
            text = text.rsplit(" ", 1)[0]
        draw.text((100, 100 + i * int(size * 1.5)), text.capitalize(), font=font, fill="black")
    return page


def photo_scan(page: Image.Image) -> Image.Image:
    """The page photographed: shrunk onto a real photo's background, lit unevenly, blurred, noisy, JPEG."""
    import numpy as np
    photo = Image.open(REAL_IMAGES / "monday.jpg").convert("RGB").resize((1300, 1700))
    sheet = page.resize((1130, 1462)).rotate(0.8, resample=Image.Resampling.BICUBIC, fillcolor="white")
    photo.paste(sheet, (85, 120))
    light = np.linspace(0.8, 1.05, photo.width)[None, :, None]
    noise = np.random.default_rng(0).normal(0, 6, (photo.height, photo.width, 3))
    shot = np.clip(np.asarray(photo.filter(ImageFilter.GaussianBlur(0.6)), dtype=np.float32) * light + noise, 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(shot.astype("uint8")).save(buffer, format="JPEG", quality=70)
    return Image.open(buffer).convert("RGB")


def saved(image: Image.Image, path: Path) -> str:
    image.save(path)
    return str(path)


# ----------------------------------------------------------------------------- detection


@pytest.mark.slow
@pytest.mark.parametrize("size,lines", [(24, 20), (18, 48)], ids=["half-page", "full-page"])
def test_osd_turns_sideways_and_upside_down_text_pages_upright(tesseract, tmp_path, size, lines):
    upright = text_page(size, lines)
    for angle in (0, 90, 180, 270):
        given = turn(upright, -angle)  # the page as scanned: reading it needs a clockwise turn of `angle`
        page = next(file_pages(saved(given, tmp_path / f"scan{angle}.png")))
        assert (page.rotation, page.rotation_source) == (angle, "osd"), angle
        assert page.image.tobytes() == upright.tobytes() and page.size_as_given == given.size
        assert page.as_given().tobytes() == given.tobytes()


@pytest.mark.slow
def test_osd_turns_a_photographed_page(tesseract):
    if not REAL_IMAGES.is_dir():
        pytest.skip("shared/real-images is not beside the repository")
    upright = photo_scan(text_page(24, 24, seed=1))
    for angle in (0, 90, 180, 270):
        assert orient.orientation("auto", turn(upright, -angle)) == Orientation(angle, "osd"), angle


def test_a_page_without_text_is_read_as_given(tesseract, tmp_path):
    page = next(file_pages(str(Path(__file__).parent.parent / "samples" / "objects.png")))
    assert (page.rotation, page.rotation_source) == (0, None)


@pytest.mark.parametrize("angle,page_rotate", [(0, 0), (90, 0), (180, 0), (270, 0), (0, 90), (90, 90), (270, 180)])
def test_born_digital_text_drawn_turned_is_detected_from_its_text_layer(monkeypatch, tmp_path, angle, page_rotate):
    from testkit import text_pdf
    monkeypatch.setattr(orient, "run_osd", lambda *a, **k: pytest.fail("OSD ran on a page with a text layer"))
    pdf = tmp_path / "turned.pdf"
    pdf.write_bytes(text_pdf("", lines=[" ".join(WORDS[i:i + 8]) for i in range(0, 64, 4)], size=14, angle=angle,
                             rotate=page_rotate))
    page = next(file_pages(str(pdf)))
    expected = (angle - page_rotate) % 360  # text drawn turned counterclockwise; /Rotate turns the page clockwise
    assert (page.rotation, page.rotation_source) == (expected, "text_layer")
    ink = Image.eval(page.image.convert("L"), lambda v: 255 - v).getbbox()  # the text starts at its own top left
    assert ink is not None and ink[0] < page.image.width * 0.3 and ink[1] < page.image.height * 0.3, ink
    assert ink[2] - ink[0] > ink[3] - ink[1]  # lines run across


def test_a_thin_text_layer_leaves_the_decision_to_osd(monkeypatch, tmp_path):
    from testkit import text_pdf
    asked = []
    monkeypatch.setattr(orient, "run_osd", lambda image, *a: asked.append(image.size))
    pdf = tmp_path / "label.pdf"
    pdf.write_bytes(text_pdf("", lines=["p. 7"], angle=90))  # 4 characters say nothing about the page
    page = next(file_pages(str(pdf)))
    assert asked and (page.rotation, page.rotation_source) == (0, None)


def test_without_tesseract_auto_warns_once_and_reads_as_given(monkeypatch, tmp_path):
    monkeypatch.setenv(orient.TESSERACT_ENV, "vl2-no-such-tesseract")
    orient._warned.clear()
    for name in ("a.png", "b.png"):
        shutil.copy(IMG, tmp_path / name)
    result = vl2("ocr", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--json", "--split", "never", tokens=2)
    assert result.exit_code == 0, result.output
    assert result.stderr.count("rotation detection for pages without a text layer is off") == 1
    assert "apt install tesseract-ocr" in result.stderr
    records = json.loads(result.stdout)
    assert [(r["rotation"], r["rotation_source"]) for r in records] == [(0, None), (0, None)]
    turned = vl2("ocr", str(tmp_path / "a.png"), "--json", "--rotate", "90", "--split", "never", tokens=2)
    record = json.loads(turned.stdout)[0]
    assert (record["rotation"], record["rotation_source"], record["width"], record["height"]) == (90, "user", 300, 200)
    assert_valid_record(record)


def test_rotate_takes_only_auto_off_and_right_angles(tmp_path):
    from vl2cli.errors import UsageError
    with pytest.raises(UsageError, match="--rotate '45'"):
        PageOptions(rotate="45")
    bad = vl2("ocr", IMG, "--rotate", "sideways")
    assert bad.exit_code == 2 and "--rotate 'sideways': expected auto, off, 0, 90, 180 or 270" in bad.stderr
    for rotate, expected in (("off", (0, None)), ("0", (0, "user")), ("180", (180, "user"))):
        page = next(file_pages(IMG, PageOptions(rotate=rotate)))
        assert (page.rotation, page.rotation_source) == expected


# ----------------------------------------------------------------------------- mapping back


@pytest.mark.parametrize("angle", [90, 180, 270])
def test_a_box_found_on_the_turned_page_maps_back_onto_the_page_as_given(angle):
    given = Image.new("RGB", (640, 400), "white")
    known = [420, 60, 520, 300]  # x1, y1, x2, y2 on the page as given
    ImageDraw.Draw(given).rectangle([known[0], known[1], known[2] - 1, known[3] - 1], fill="red")
    read = turn(given, angle)
    seen = Image.eval(read.getchannel("G"), lambda v: 255 - v).getbbox()  # where the red box is on the page as read
    assert box_as_given(list(seen), angle, *given.size) == known
    norm = [seen[0] / read.width * 999, seen[1] / read.height * 999, seen[2] / read.width * 999,
            seen[3] / read.height * 999]
    fields = fields_as_given({"objects": [{"label": "box", "box": list(seen), "box_norm": norm}], "caption": "x"},
                             angle, given.size)
    assert fields["objects"][0]["box"] == known and fields["caption"] == "x"
    back = fields["objects"][0]["box_norm"]
    assert [round(v / 999 * s) for v, s in zip(back, given.size * 2)] == known


@pytest.mark.parametrize("angle", [90, 180, 270])
def test_ground_on_a_turned_page_boxes_the_original(monkeypatch, tmp_path, angle):
    """The model (its answer fixed here) boxes the red square on the page as read; the record, its box and the
    annotated PNG are on the original image."""
    from vl2cli.reader import Reader
    given = Image.new("RGB", (600, 400), "white")
    known = [400, 50, 560, 170]
    ImageDraw.Draw(given).rectangle([known[0], known[1], known[2] - 1, known[3] - 1], fill="red")
    read = turn(given, angle)
    seen = Image.eval(read.getchannel("G"), lambda v: 255 - v).getbbox()
    norm = [round(seen[0] / read.width * 999), round(seen[1] / read.height * 999), round(seen[2] / read.width * 999),
            round(seen[3] / read.height * 999)]
    answer = f"<|ref|>the red box<|/ref|><|det|>[[{', '.join(map(str, norm))}]]<|/det|>"
    monkeypatch.setattr(Reader, "decode", lambda self, ids: answer)
    source = saved(given, tmp_path / "given.png")
    out = tmp_path / "out"
    result = vl2("ground", source, "the red box", "--rotate", str(angle), "--out", str(out), "--no-strict", tokens=2)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "given.png.p0001.ground.json").read_text())
    assert_valid_record(record)
    assert (record["rotation"], record["rotation_source"], record["width"], record["height"]) == (
        angle, "user", 600, 400)
    box = record["objects"][0]["box"]
    assert all(abs(a - b) <= 2 for a, b in zip(box, known)), (box, known)
    assert 0 <= box[0] < box[2] <= 600 and 0 <= box[1] < box[3] <= 400
    drawn = Image.open(out / "given.png.p0001.ground.boxes.png").convert("RGB")
    assert drawn.size == given.size  # the page as given, with the box drawn where the square is
    assert drawn.getpixel((box[0] + 1, (box[1] + box[3]) // 2)) != given.getpixel((box[0] - 3, (box[1] + box[3]) // 2))
    assert drawn.getpixel((box[0] + 1, (box[1] + box[3]) // 2))[1] > 0  # the outline, not the red fill


def test_layout_blocks_and_figure_crops_are_on_the_page_as_given(tmp_path):
    from tests.test_pipeline import folder_sink
    from vl2cli.pages import Page, Source
    from vl2cli.pipeline import PageItem
    from vl2cli.results import PageResult
    given = Image.new("RGB", (500, 700), "white")
    known = [300, 400, 450, 600]
    ImageDraw.Draw(given).rectangle([known[0], known[1], known[2] - 1, known[3] - 1], fill="blue")
    read = turn(given, 270)
    seen = Image.eval(read.getchannel("R"), lambda v: 255 - v).getbbox()
    norm = [round(seen[0] / read.width * 999), round(seen[1] / read.height * 999), round(seen[2] / read.width * 999),
            round(seen[3] / read.height * 999)]
    answer = f"<|ref|>image<|/ref|><|det|>[{norm}]<|/det|>\n<|ref|>text<|/ref|><|det|>[[0, 0, 999, 100]]<|/det|>\nHi"
    sink, job = folder_sink(tmp_path, "ocr", "markdown")
    fields, _ = job.task.parse(answer, read.size, None)
    fields = fields_as_given(fields, 270, given.size)
    box = fields["blocks"][0]["box"]
    assert all(abs(a - b) <= 2 for a, b in zip(box, known)), (box, known)
    assert fields["blocks"][1]["box"] == box_as_given([0, 0, 700, 50], 270, 500, 700)
    result = PageResult("p.png", 1, "ocr", "ok", answer=answer, width=500, height=700, rotation=270,
                        rotation_source="osd", fields=fields)
    source = Source("p.png", "p.png", name="p.png", digest="d", numbers=[1])
    sink.emit(PageItem(source, 1, "k" * 32), result, Page("p.png", 1, read, rotation=270, rotation_source="osd"))
    crop = Image.open(tmp_path / "p.png.p0001.ocr.fig1.png").convert("RGB")
    assert crop.size == (box[2] - box[0], box[3] - box[1])  # cut from the page as given, where the box is
    assert sum(crop.getpixel((x, y)) == (0, 0, 255) for x in range(crop.width) for y in range(crop.height)) \
        > 0.9 * crop.width * crop.height


# ----------------------------------------------------------------------------- keys, summary, server


def test_rotate_is_part_of_the_page_key_and_the_batch_summary_counts_turned_pages(tmp_path):
    from vl2cli.options import ReadOptions
    from vl2cli.pages import Source
    from vl2cli.pipeline import Job
    from vl2cli.tasks import get_task
    source = Source("a.png", "a.png", name="a.png", digest="d", numbers=[1])
    keys = {Job(get_task("ocr"), ReadOptions(), PageOptions(rotate=rotate), "json", "m", "t").page_key(source, 1)
            for rotate in ("auto", "off", "0", "90")}
    assert len(keys) == 4
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.png", "b.png"):
        shutil.copy(IMG, src / name)
    first = vl2("batch", str(src), "--out", str(tmp_path / "out"), "--rotate", "90", "--json", "--split", "never",
                tokens=2)
    summary = json.loads(first.stdout)
    assert first.exit_code == 0 and summary["pages_turned"] == 2 and summary["turned_by"] == {"user": 2}
    again = json.loads(vl2("batch", str(src), "--out", str(tmp_path / "out"), "--rotate", "off", "--json",
                           "--split", "never", tokens=2).stdout)
    assert again["pages_done"] == 2 and again["pages_skipped"] == 0 and again["pages_turned"] == 0  # new results


def test_the_document_endpoint_takes_rotate(tmp_path):
    import httpx

    from tests.helpers import TINY, running_server
    from vl2cli.engine.loading import load_model
    from vl2cli.reader import Reader
    reader = Reader(load_model(TINY, device="cpu", dtype="float32", quant="none"))
    with running_server(reader) as (url, _server):
        with open(IMG, "rb") as f:
            turned = httpx.post(f"{url}/v1/documents/ocr", files={"file": ("note.png", f, "image/png")},
                                data={"max_tokens": "2", "split": "never", "rotate": "270"}, timeout=60)
        bad = httpx.post(f"{url}/v1/documents/ocr", files={"file": ("note.png", open(IMG, "rb"), "image/png")},
                         data={"rotate": "45"}, timeout=60)
    assert turned.status_code == 200, turned.text
    record = turned.json()[0]
    assert (record["rotation"], record["rotation_source"], record["width"], record["height"]) == (270, "user", 300, 200)
    assert bad.status_code == 400 and "--rotate '45'" in bad.json()["error"]["message"]


def test_the_missing_tesseract_warning_goes_to_the_log_once(monkeypatch, caplog):
    monkeypatch.setenv(orient.TESSERACT_ENV, "vl2-no-such-tesseract")
    orient._warned.clear()
    with caplog.at_level(logging.WARNING, logger="vl2cli"):
        assert orient.orientation("auto", Image.open(IMG)) == Orientation()
        assert orient.orientation("auto", Image.open(IMG)) == Orientation()
        assert orient.orientation("90", Image.open(IMG)) == Orientation(90, "user")
    assert sum("Tesseract is not installed" in r.getMessage() for r in caplog.records) == 1


def test_osd_work_is_bounded_by_the_copy_it_reads_and_a_time_limit(monkeypatch, tmp_path):
    """Whatever the page, Tesseract reads a grey copy at most OSD_SIDE px long; a Tesseract that hangs is given up on
    after OSD_TIMEOUT_SECONDS and the page is read as given."""
    for size, expected in (((12000, 300), (2400, 60)), ((100, 60), (200, 120)), ((1224, 1584), (1855, 2400))):
        copy = Image.open(io.BytesIO(orient.osd_image(Image.new("RGB", size, "white"))))
        assert (copy.mode, copy.size) == ("L", expected)
    hang = tmp_path / "tesseract"
    hang.write_text("#!/bin/sh\nexec sleep 30\n")
    hang.chmod(0o755)
    monkeypatch.setenv(orient.TESSERACT_ENV, str(hang))
    monkeypatch.setattr(orient, "OSD_TIMEOUT_SECONDS", 0.5)
    import time
    start = time.perf_counter()
    assert orient.orientation("auto", Image.open(IMG)) == Orientation()
    assert time.perf_counter() - start < 10


def test_a_detection_failure_never_fails_the_page(monkeypatch, tmp_path):
    def broken(*_args, **_kwargs):
        raise ValueError("a Tesseract answer nobody expected")
    monkeypatch.setattr(orient, "run_osd", broken)
    page = next(file_pages(IMG))
    assert (page.rotation, page.rotation_source) == (0, None) and page.image.size == (300, 200)
