"""Answer parsers: realistic outputs parse, and any string at all never crashes them."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vl2cli.bands import merge_band_texts, split_bands
from vl2cli.engine.vl2.config import _all_candidates
from vl2cli.engine.vl2.processor import select_best_resolution
from vl2cli.parsers import find_loop, parse_grounding, parse_tables, scale_box, strip_grounding_tags, trim_loop


def test_markdown_table():
    text = "Here:\n| Item | Qty | Price |\n|---|:--:|--:|\n| Pen | 2 | 1.50 |\n| Ink \\| blue | 1 | 3 |\nDone."
    assert parse_tables(text) == [{"columns": ["Item", "Qty", "Price"],
                                   "rows": [["Pen", "2", "1.50"], ["Ink | blue", "1", "3"]]}]


def test_html_table_with_colspan_and_nesting():
    text = ("<table><tr><th>A</th><th>B</th></tr><tr><td colspan=2>wide</td></tr>"
            "<tr><td>1</td><td><table><tr><td>x</td></tr></table></td></tr></table>")
    tables = parse_tables(text)
    outer = tables[-1]
    assert outer["columns"] == ["A", "B"] and outer["rows"][0] == ["wide", ""]
    assert {"columns": ["x"], "rows": []} in tables


def test_latex_table():
    text = r"\begin{tabular}{|l|r|}\hline Name & Total \\ \hline Bob & 12 \\ \end{tabular}"
    assert parse_tables(text) == [{"columns": ["Name", "Total"], "rows": [["Bob", "12"]]}]


def test_grounding_official_answer():
    answer = "<|ref|>The giraffe at the back.<|/ref|><|det|>[[580, 270, 999, 900]]<|/det|>"
    objs = parse_grounding(answer, 1000, 500)
    assert objs == [{"label": "The giraffe at the back.", "box_norm": [580.0, 270.0, 999.0, 900.0],
                     "box": [580, 135, 1000, 450]}]


def test_grounded_caption_several_boxes_and_bad_numbers():
    answer = ("A <|ref|>cat<|/ref|><|det|>[[10,20,30,40],[50,60,70,80]]<|/det|> beside "
              "<|ref|>a dog<|/ref|><|det|>[[1200, -5, nan, 4]]<|/det|> and <|det|>[[900,900,100,100]]")
    objs = parse_grounding(answer, 999, 999, default_label="q")
    assert [o["label"] for o in objs] == ["cat", "cat", "q"]
    assert objs[2]["box_norm"] == [100.0, 100.0, 900.0, 900.0]  # corners ordered
    assert strip_grounding_tags(answer).startswith("A cat beside a dog")


ANSWER_PIECES = [*list("|<>/-:[],.0123456789 \n\\&"), "<table>", "</table>", "<tr>", "<td>", "</td>",
                 "<th colspan=99999>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "\\begin{tabular}", "\\\\",
                 "NaN", "inf", "1e999"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(ANSWER_PIECES), max_size=120).map("".join) | st.text())
def test_parsers_never_crash_and_boxes_stay_inside(text):
    for table in parse_tables(text):
        assert all(len(r) == len(table["columns"]) for r in table["rows"])
    for obj in parse_grounding(text, 640, 480):
        x1, y1, x2, y2 = obj["box"]
        assert 0 <= x1 <= x2 <= 640 and 0 <= y1 <= y2 <= 480


@given(st.lists(st.floats(-1e6, 1e6), min_size=4, max_size=4), st.integers(1, 20000), st.integers(1, 20000))
def test_box_scaling_stays_in_image(box, w, h):
    px = scale_box(box, w, h)
    assert 0 <= px[0] <= w and 0 <= px[2] <= w and 0 <= px[1] <= h and 0 <= px[3] <= h


@given(st.integers(1, 8000), st.integers(1, 8000))
def test_tiling_choice_is_a_candidate_and_uses_the_most_pixels(w, h):
    cands = _all_candidates()
    best = select_best_resolution((w, h), cands)
    assert best in cands

    def effective(c):
        s = min(c[0] / w, c[1] / h)
        return min(int(w * s) * int(h * s), w * h)
    assert all(effective(best) >= effective(c) for c in cands)


def test_loop_detection():
    assert find_loop([5, 6, 7] * 40) == 3
    assert find_loop(list(range(200))) is None
    row = list(range(10, 22))  # a 12-token table row repeated 5 times is content, not a loop
    assert find_loop(list(range(100)) + row * 5) is None
    assert find_loop(list(range(100)) + row * 9) == 12
    assert trim_loop([1, 2] + [9, 8] * 30, 2) == [1, 2, 9, 8]


def test_band_split_covers_page_and_merge_drops_overlap():
    from PIL import Image
    bands = split_bands(Image.new("RGB", (100, 300)), 3)
    assert bands[0].size[1] > 100 and sum(b.size[1] for b in bands) >= 300
    assert merge_band_texts(["a\nb\nc", "b\nc\nd", "d\ne"]) == "a\nb\nc\nd\ne"


def test_density_estimate_tells_dense_print_from_photos_and_forms():
    from PIL import Image
    from testkit import text_pdf

    from tests.helpers import file_pages
    from vl2cli.bands import looks_dense
    words = "The committee reviewed the quarterly figures and noted that revenue in the north rose".split()
    lines = [" ".join(words[(i * 3) % 10:] + words[:(i * 3) % 10]) for i in range(55)]
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        for n, expect in ((55, True), (6, False)):
            path = f"{tmp}/{n}.pdf"
            with open(path, "wb") as f:
                f.write(text_pdf("", lines=lines[:n], size=11))
            assert looks_dense(next(file_pages(path)).image) is expect
    assert not looks_dense(Image.new("RGB", (800, 600), "white"))
    noise = Image.effect_noise((640, 480), 120).convert("RGB")
    assert not looks_dense(noise.resize((64, 48)).resize((640, 480)))  # photo-like blobs


def test_degenerate_page_shapes_stay_bounded():
    from PIL import Image

    from vl2cli.bands import DENSITY_MAX_HEIGHT, band_count, looks_dense, planned_bands, split_bands
    strip = Image.new("RGB", (2, 20000), "white")  # would be a 2.6-gigapixel intermediate at 512 px wide
    assert looks_dense(strip) is False
    tall = Image.new("RGB", (10, 400000 // 10), "black")
    assert looks_dense(tall) in (True, False)  # bounded: at most 512 x DENSITY_MAX_HEIGHT pixels
    assert DENSITY_MAX_HEIGHT * 512 < 2_000_000
    flat = Image.new("RGB", (14400, 2), "white")  # a page 2 px tall: no band of height 0
    assert band_count(flat, 3) == 1 and split_bands(flat, 3)[0].size == (14400, 2)
    assert planned_bands("3", flat, None) == (1, None) and planned_bands("auto", flat, None) == (1, None)


@given(st.integers(1, 3000), st.integers(1, 3000), st.integers(1, 16))
@settings(max_examples=80, deadline=None)
def test_bands_always_cover_the_page_with_real_rows(width, height, n):
    from PIL import Image

    from vl2cli.bands import split_bands
    bands = split_bands(Image.new("L", (width, height)), n)
    assert 1 <= len(bands) <= n and all(b.height >= 1 and b.width == width for b in bands)
    assert sum(b.height for b in bands) >= height
