"""Rotation detection: accuracy and cost of Tesseract's OSD as vl2 runs it, on a generated, seeded set of pages.

Each page is US letter at 144 DPI (1224 x 1584, what `vl2` renders a PDF page at), text set with a real TrueType font
(DejaVu / Liberation: Sans, Serif, Mono), at one of three densities (a short letter, half a page, a full page in two
columns) and one of three noise levels (clean; a flatbed scan: grey paper, skew, blur, sensor noise; a phone photo:
the sheet on a real photo's background from ../shared/real-images when present, uneven light, blur, heavy noise,
JPEG). Every page is then turned to one of the four angles, in equal numbers. For each page: what OSD answers, its
confidence and the seconds it took (downscaling and encoding included). From that: the right / wrong / abstained
counts at each confidence threshold (the threshold vl2 uses is `OSD_MIN_CONFIDENCE`), and beside it the text layer's
cost on a dense born-digital page and one page's read time (prefill) at DeepSeek-VL2-tiny's shapes.

    nice -n 10 python benchmarks/run.py rotation            # 240 pages
    nice -n 10 python benchmarks/run.py rotation --smoke    # 4 pages, no prefill (CI)
"""

from __future__ import annotations

import glob
import itertools
import random
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter, ImageFont

from vl2cli.orient import OSD_MIN_CONFIDENCE, OSD_SIDE, ROTATIONS, run_osd, turn

SEED = 21
PAGE = (1224, 1584)
FONT_FILES = {"DejaVu Sans": "dejavu/DejaVuSans.ttf", "DejaVu Serif": "dejavu/DejaVuSerif.ttf",
              "DejaVu Sans Mono": "dejavu/DejaVuSansMono.ttf", "Liberation Sans": "liberation/LiberationSans-Regular.ttf",
              "Liberation Serif": "liberation/LiberationSerif-Regular.ttf",
              "Liberation Mono": "liberation/LiberationMono-Regular.ttf"}
FONT_ROOT = Path("/usr/share/fonts/truetype")
DENSITIES = ("letter", "half", "full")
NOISE = ("clean", "scan", "photo")
REAL_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "real-images"
THRESHOLDS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0)
WORDS = ("the of and to in is for on that by this with from are be as at or an it was not which have has all "
         "invoice total amount date page report table number customer account payment due balance order item "
         "quantity price tax address company services period statement summary results method analysis data "
         "section figure model value system time year first new other more these only between under after "
         "during within against following including general annual meeting board committee approved agreement "
         "contract party shall provided notice received receipt reference department office manager signed").split()


def fonts() -> dict[str, Path]:
    found = {name: FONT_ROOT / rel for name, rel in FONT_FILES.items() if (FONT_ROOT / rel).is_file()}
    if not found:
        raise SystemExit(f"no TrueType fonts under {FONT_ROOT}: apt install fonts-dejavu-core fonts-liberation")
    return found


def sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words)), f"{rng.randint(1, 9999):,}.{rng.randint(0, 99):02d}")
    words[0] = words[0].capitalize()
    return " ".join(words) + rng.choice(".,;:.")


def text_page(rng: random.Random, font_path: Path, density: str) -> Image.Image:
    """An upright page of text: size and spacing from the density, words from a fixed vocabulary."""
    size = rng.randint(16, 26) if density != "full" else rng.randint(13, 18)
    font = ImageFont.truetype(str(font_path), size)
    page = Image.new("L", PAGE, 255)
    draw = ImageDraw.Draw(page)
    line_height = int(size * 1.45)
    margin = 100
    columns = [(margin, PAGE[0] - margin)] if density != "full" else [(margin, 590), (640, PAGE[0] - margin)]
    lines = {"letter": rng.randint(6, 12), "half": rng.randint(18, 26), "full": 10_000}[density]
    draw.text((margin, margin - 10), sentence(rng, 4).rstrip(".,;:").upper(), font=font, fill=0)
    for left, right in columns:
        y = margin + 3 * line_height
        for _ in range(lines):
            if y > PAGE[1] - margin:
                break
            text = ""
            while True:  # fill the line to the column's width
                longer = (text + " " + rng.choice(WORDS)).strip()
                if draw.textlength(longer, font=font) > right - left:
                    break
                text = longer
            draw.text((left, y), text, font=font, fill=0)
            y += line_height * (2 if rng.random() < 0.12 else 1)  # paragraph breaks
    return page


def _background(rng: random.Random, photos: list[Path]) -> Image.Image:
    if photos:
        photo = Image.open(rng.choice(photos)).convert("L")
        scale = max(PAGE[0] * 1.2 / photo.width, PAGE[1] * 1.2 / photo.height)
        return photo.resize((int(photo.width * scale) + 1, int(photo.height * scale) + 1)).crop((0, 0, *PAGE))
    return Image.linear_gradient("L").resize(PAGE).point(lambda v: 60 + v // 3)


def degrade(rng: random.Random, page: Image.Image, noise: str, photos: list[Path]) -> Image.Image:
    """clean: as set; scan: grey paper, a small skew, blur, sensor noise; photo: the sheet shrunk onto a real photo,
    uneven light, more blur and noise, JPEG at low quality."""
    import io

    import numpy as np
    if noise == "clean":
        return page.convert("RGB")
    skew = rng.uniform(-1.5, 1.5)
    paper = rng.randint(225, 245)
    sheet = page.point(lambda v: v * paper // 255).rotate(skew, resample=Image.Resampling.BICUBIC, fillcolor=paper)
    if noise == "photo":
        canvas = _background(rng, photos)
        small = sheet.resize((int(PAGE[0] * 0.86), int(PAGE[1] * 0.86)), Image.Resampling.LANCZOS)
        canvas.paste(small, ((PAGE[0] - small.width) // 2 + rng.randint(-30, 30),
                             (PAGE[1] - small.height) // 2 + rng.randint(-30, 30)))
        light = np.linspace(rng.uniform(0.65, 0.85), rng.uniform(1.0, 1.1), PAGE[0])[None, :]
        sheet = Image.fromarray(np.clip(np.asarray(canvas, dtype=np.float32) * light, 0, 255).astype("uint8"))
    sigma, blur = (8.0, 0.6) if noise == "scan" else (18.0, 1.1)
    sheet = sheet.filter(ImageFilter.GaussianBlur(blur))
    noisy = np.asarray(sheet, dtype=np.float32) + np.random.default_rng(rng.randrange(2**32)).normal(0, sigma, sheet.size[::-1])
    out = Image.fromarray(np.clip(noisy, 0, 255).astype("uint8")).convert("RGB")
    if noise == "photo":
        buffer = io.BytesIO()
        out.save(buffer, format="JPEG", quality=rng.randint(30, 50))
        out = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return out


def generated_pages(n: int, seed: int = SEED):
    """(description, the page as given, the turn that makes it upright): n pages, the four angles in turn, each
    combination of font, density and noise (shuffled by the seed) at all four angles before the next."""
    rng = random.Random(seed)
    font_list = sorted(fonts().items())
    photos = sorted(Path(p) for p in glob.glob(str(REAL_IMAGES / "*")))
    combos = list(itertools.product(font_list, DENSITIES, NOISE))  # every combination at every angle
    rng.shuffle(combos)
    for i in range(n):
        (name, path), density, noise = combos[(i // len(ROTATIONS)) % len(combos)]
        angle = ROTATIONS[i % len(ROTATIONS)]
        upright = degrade(rng, text_page(rng, path, density), noise, photos)
        yield {"font": name, "density": density, "noise": noise, "angle": angle}, turn(upright, -angle), angle


def calibration(rows: list[dict]) -> list[dict]:
    """At each threshold: pages turned right, read as given (abstained: right only for upright pages), turned wrong."""
    table = []
    for t in THRESHOLDS:
        right = wrong = abstained = 0
        for r in rows:
            accepted = r["osd"] is not None and r["confidence"] >= t
            if not accepted:
                abstained += 1
            elif r["osd"] == r["angle"]:
                right += 1
            else:
                wrong += 1
        upright_abstained = sum(1 for r in rows if r["angle"] == 0 and not (r["osd"] is not None and r["confidence"] >= t))
        table.append({"threshold": t, "turned_right": right, "turned_wrong": wrong, "abstained": abstained,
                      "pages_read_upright": right + upright_abstained, "pages": len(rows)})
    return table


def _text_layer_seconds(pages: int = 20) -> dict:
    """The text layer's vote on a dense born-digital page (60 lines drawn sideways), per page, with the render beside it."""
    import pypdfium2 as pdfium
    from testkit import text_pdf

    from vl2cli.orient import text_layer_rotation
    rng = random.Random(SEED)
    lines = [sentence(rng, 12) for _ in range(40)]
    doc = pdfium.PdfDocument(text_pdf("", pages=pages, lines=lines, size=10, angle=90))
    vote = render = 0.0
    chars = 0
    answers = set()
    for i in range(pages):
        page = doc[i]
        start = time.perf_counter()
        page.render(scale=2).to_pil()
        render += time.perf_counter() - start
        start = time.perf_counter()
        textpage = page.get_textpage()
        answers.add(text_layer_rotation(textpage, page.get_rotation()))
        chars = textpage.count_chars()
        textpage.close()
        vote += time.perf_counter() - start
        page.close()
    doc.close()
    return {"chars_per_page": chars, "seconds_per_page": vote / pages, "render_seconds_per_page": render / pages,
            "answers": sorted(answers)}


def _read_seconds() -> dict:
    """One letter page's prefill at DeepSeek-VL2-tiny's shapes (full vision encoder, 2 of its 12 decoder layers,
    random bf16 weights): a lower bound of a page's read time on this machine."""
    import torch
    from gpucheck import page_prompt
    from testkit import random_model

    from vl2cli.engine.generation import Engine
    from vl2cli.engine.vl2.config import preset_config
    cfg = preset_config("tiny", num_hidden_layers=2)
    model = random_model(cfg, dtype=torch.bfloat16)
    prompt = page_prompt(cfg)
    engine = Engine(model, -1, 0)
    start = time.perf_counter()
    engine.prefill([prompt], 0)
    return {"prefill_seconds": time.perf_counter() - start, "decoder_layers": 2, "image_tokens": sum(prompt.image_mask)}


def bench_rotation(smoke: bool) -> dict:
    n = 4 if smoke else 240
    rows = []
    for described, page, angle in generated_pages(n):
        start = time.perf_counter()
        answer = run_osd(page)
        seconds = time.perf_counter() - start
        rows.append({**described, "angle": angle, "osd": None if answer is None else answer.rotation,
                     "confidence": 0.0 if answer is None else answer.confidence, "seconds": seconds})
    table = calibration(rows)
    used = next(t for t in table if t["threshold"] == OSD_MIN_CONFIDENCE)
    by_noise = {}
    for noise in NOISE:
        part = [r for r in rows if r["noise"] == noise]
        if part:
            at = next(t for t in calibration(part) if t["threshold"] == OSD_MIN_CONFIDENCE)
            by_noise[noise] = {k: at[k] for k in ("turned_right", "turned_wrong", "abstained", "pages")}
    seconds = sorted(r["seconds"] for r in rows)
    return {"bench": "rotation", "pages": n, "seed": SEED, "fonts": sorted(fonts()), "osd_side": OSD_SIDE,
            "threshold": OSD_MIN_CONFIDENCE, "at_threshold": used, "by_noise": by_noise, "calibration": table,
            "osd_seconds_median": seconds[len(seconds) // 2], "osd_seconds_max": seconds[-1],
            "wrong": [r for r in rows if r["osd"] is not None and r["confidence"] >= OSD_MIN_CONFIDENCE
                      and r["osd"] != r["angle"]],
            "text_layer": _text_layer_seconds(4 if smoke else 20),
            "read": None if smoke else _read_seconds()}  # the smoke run leaves out the minutes a prefill takes
