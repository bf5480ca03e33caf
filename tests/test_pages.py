"""Inputs: PDFs, image formats and modes, page ranges, stdin, folders and globs."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image
from testkit import text_pdf
from typer.testing import CliRunner

from tests.helpers import CKPT, file_pages
from vl2cli.cli import app
from vl2cli.errors import UsageError
from vl2cli.options import PageOptions
from vl2cli.pages import expand_inputs, normalise_image, parse_page_ranges

TINY = str(CKPT / "tiny")


def test_page_ranges():
    assert parse_page_ranges("1-3,7") == [(1, 3), (7, 7)]
    assert parse_page_ranges("5-")[0][0] == 5
    for bad in ("0", "3-1", "x", "1-2-3", "-1", "-3"):
        with pytest.raises(UsageError):
            parse_page_ranges(bad)
    with pytest.raises(UsageError, match="for the first N pages write 1-N"):
        parse_page_ranges("-1")


def test_pdf_pages_and_text_layer(tmp_path):
    pdf = tmp_path / "d.pdf"
    pdf.write_bytes(text_pdf("hello", pages=5))
    pages = list(file_pages(str(pdf), PageOptions(pages="2,4-", dpi=72, text_layer=True)))
    assert [p.number for p in pages] == [2, 4, 5]
    assert pages[0].image.size == (612, 792) and "hello p2" in pages[0].text_layer


def test_multipage_tiff_every_frame_gif_first(tmp_path):
    frames = [Image.new("RGB", (40, 30), c) for c in ("red", "green", "blue")]
    frames[0].save(tmp_path / "t.tiff", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    tiff = list(file_pages(str(tmp_path / "t.tiff")))
    assert [p.number for p in tiff] == [1, 2, 3] and tiff[2].image.getpixel((0, 0)) == (0, 0, 255)
    assert len(list(file_pages(str(tmp_path / "a.gif")))) == 1


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (60, 20), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert next(file_pages(str(tmp_path / "r.jpg"))).image.size == (20, 60)


@pytest.mark.parametrize("mode", ["I;16", "CMYK", "P", "RGBA", "LA", "L", "1", "F"])
def test_every_mode_becomes_rgb(mode):
    src = Image.new("RGB", (8, 8), (200, 10, 10))
    img = src.convert(mode) if mode not in ("I;16", "F") else Image.new(mode, (8, 8), 1000)
    out = normalise_image(img)
    assert out.mode == "RGB" and out.size == (8, 8)


def test_alpha_is_flattened_on_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert normalise_image(img).getpixel((0, 0)) == (255, 255, 255)


def test_stdin_input(monkeypatch):
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), "white").save(buf, format="PNG")
    result = CliRunner().invoke(app, ["ocr", "-", "--model", TINY, "--max-new-tokens", "2", "--json"],
                                input=buf.getvalue())
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["source"] == "<stdin>"


def test_folders_are_searched_recursively_and_globs_filter(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "b" / "x.png")
    (tmp_path / "a" / "note.txt").write_text("skip me")
    (tmp_path / "a" / "y.pdf").write_bytes(text_pdf("y"))
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / ".hidden.png")
    found = expand_inputs([str(tmp_path / "a")])
    assert [p.split("/")[-1] for p in found.files] == ["x.png", "y.pdf"]
    assert found.hidden_skipped == 1  # left out, and counted so the CLI can say so
    assert found.other_skipped == 1  # note.txt: not a document, left out and counted too
    assert found.names[found.files[0]] == "b/x.png"  # the name under --out: the path inside the given folder
    assert [p.split("/")[-1] for p in expand_inputs([str(tmp_path / "a")], glob="*.pdf").files] == ["y.pdf"]


def test_chat_answers_follow_ups():
    image = str(CKPT.parent / "images" / "note_300x200.png")
    result = CliRunner().invoke(app, ["ask", image, "First question?", "--chat", "--model", TINY,
                                      "--max-new-tokens", "3"], input="A follow-up?\nexit\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") >= 2  # the answer and the follow-up's answer


def test_glob_patterns_relative_and_absolute(tmp_path, monkeypatch):
    (tmp_path / "s").mkdir()
    for name in ("a.pdf", "b.pdf", "c.png"):
        (tmp_path / "s" / name).write_bytes(b"x")
    assert [p.split("/")[-1] for p in expand_inputs([str(tmp_path / "s" / "*.pdf")]).files] == ["a.pdf", "b.pdf"]
    monkeypatch.chdir(tmp_path)
    assert expand_inputs(["s/**/*.png"]).files == ["s/c.png"]
    with pytest.raises(UsageError, match="matches no file"):
        expand_inputs(["s/*.tiff"])


def test_hidden_files_and_files_that_are_not_documents_skipped_are_reported(tmp_path):
    (tmp_path / "in").mkdir()
    Image.new("RGB", (64, 48), "white").save(tmp_path / "in" / "a.png")
    Image.new("RGB", (64, 48), "white").save(tmp_path / "in" / ".b.png")
    (tmp_path / "in" / "notes.txt").write_text("not a document")
    (tmp_path / "in" / "data.csv").write_text("a,b")
    result = CliRunner().invoke(app, ["ocr", str(tmp_path / "in"), "--model", TINY, "--max-new-tokens", "2"])
    assert result.exit_code == 0 and "1 file(s) with names starting with '.' left out" in result.stderr
    assert "2 file(s) that are not PDFs or images (by extension) left out" in result.stderr


def test_batch_with_out_equal_to_the_input_folder_says_why(tmp_path):
    Image.new("RGB", (64, 48), "white").save(tmp_path / "a.png")
    result = CliRunner().invoke(app, ["batch", str(tmp_path), "--out", str(tmp_path), "--model", TINY])
    assert result.exit_code == 2 and "is the input folder" in result.stderr and "choose a subfolder" in result.stderr


def test_max_pixels_can_admit_pages_above_pillows_own_guard(tmp_path):
    big = tmp_path / "big.png"
    Image.new("L", (10000, 9500), 255).save(big)  # 95 Mpx: over Pillow's 89 Mpx guard
    with pytest.raises(Exception, match="Mpx"):
        next(file_pages(str(big)))
    page = next(file_pages(str(big), PageOptions(max_pixels=100_000_000)))
    assert page.image.size == (10000, 9500)
