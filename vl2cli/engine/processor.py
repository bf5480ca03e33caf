"""What every family's prompts share: the checkpoint's tokenizer, extended the way the official processor does; text as
data (UserText); messages and prepared prompts; pages cut ahead (PageViews); and what DeepSeek-OCR and DeepSeek-OCR 2
share: their views, tile rule and raw prompts.

Follows deepseek-ai/DeepSeek-VL2 `deepseek_vl2/models/processing_deepseek_vl_v2.py` (the tokenizer extension) and
`process/image_process.py` of DeepSeek-OCR and DeepSeek-OCR 2 (the tile rule and raw prompts). Text that did not come
from vl2's own template is data: it is tokenized as plain text (see UserText). Each family's own processor is in its
package (engine/vl2/processor.py: the chat template and dynamic tiling; engine/ocr/, engine/ocr2/).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from tokenizers import AddedToken, Tokenizer

from vl2cli.errors import CheckpointError, UsageError

if TYPE_CHECKING:
    from vl2cli.engine.config import FamilyConfig

USER, ASSISTANT = "<|User|>", "<|Assistant|>"


class UserText(str):
    """Text that did not come from vl2's template: a question, a query, a PDF's text layer, a client's message.

    It is tokenized as plain text, so `<image>`, `<|Assistant|>` or `<｜end▁of▁sentence｜>` inside it are
    characters, never marks or special tokens: a document cannot rewrite the prompt's structure.
    """


Content = str | list[str]  # a template string, or template pieces with UserText pieces in between


def content_text(content: Content) -> str:
    return content if isinstance(content, str) else "".join(content)
GROUNDING_TOKENS = ("<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>")
EOS_TEXT = "<｜end▁of▁sentence｜>"


class VL2Tokenizer:
    """The checkpoint's byte-level BPE tokenizer, extended the way the official processor does."""

    def __init__(self, folder: str | Path, cfg: FamilyConfig):
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.exists():
            raise CheckpointError(f"{path}: the checkpoint has no tokenizer.json")
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises bare Exceptions
            raise CheckpointError(f"{path}: cannot read tokenizer ({exc})") from None
        special = _special_tokens(folder)

        # Order matters: new tokens take the next free ids in exactly this sequence.
        pad = special.get("pad_token")
        if pad is None:
            pad = cfg.pad_token
            self._add([pad])
        if self.tok.token_to_id(cfg.image_token) is None:
            self._add([cfg.image_token])
        self._add(list(GROUNDING_TOKENS))
        self._add([USER, ASSISTANT])
        bos, eos = special.get("bos_token"), special.get("eos_token")
        pad_id, image_id = self.tok.token_to_id(pad), self.tok.token_to_id(cfg.image_token)
        bos_id = self.tok.token_to_id(bos) if bos else cfg.language.bos_token_id
        eos_id = self.tok.token_to_id(eos) if eos else cfg.language.eos_token_id
        if bos_id is None or eos_id is None or pad_id is None or image_id is None:
            raise CheckpointError(f"{path}: begin/end-of-sentence or pad tokens {bos!r}/{eos!r}/{pad!r} are not in "
                                  "the vocabulary")
        self.pad_id: int = pad_id
        self.image_id: int = image_id
        self.bos_id: int = bos_id
        self.eos_id: int = eos_id
        self.special_ids = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        specials = sorted(self.special_ids, key=len, reverse=True)
        self.special_pattern = re.compile("(" + "|".join(re.escape(t) for t in specials) + ")")
        self.plain = Tokenizer.from_str(self.tok.to_str())  # the same vocabulary, special tokens not matched
        self.plain.encode_special_tokens = True

    def _add(self, tokens: list[str]) -> None:
        self.tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])

    def encode(self, text: str) -> list[int]:
        """Template text: special tokens written in it become their ids (what the official processor does)."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_plain(self, text: str) -> list[int]:
        """Data: every character is text, special-token look-alikes included."""
        return self.plain.encode(text, add_special_tokens=False).ids

    def encode_content(self, parts: list[str]) -> list[int]:
        """Template pieces (specials matched) and UserText pieces (plain), with the ids whole-string tokenization
        would give whenever the data holds no special token: text between specials is encoded as one run."""
        ids: list[int] = []
        run: list[str] = []
        for part in parts:
            pieces = [part] if isinstance(part, UserText) else self.special_pattern.split(part)
            for i, piece in enumerate(pieces):
                if i % 2 == 1:  # a special token of the template (the pattern holds only vocabulary entries)
                    ids += self.encode_plain("".join(run)) if run else []
                    run = []
                    ids.append(self.special_ids[piece])
                elif piece:
                    run.append(piece)
        return ids + (self.encode_plain("".join(run)) if run else [])

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)


def _special_tokens(folder: Path) -> dict[str, str]:
    """bos/eos/pad entries of special_tokens_map.json and tokenizer_config.json (a token string or {content}), each
    as its token's text."""
    special: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if not path.exists():
            continue
        try:
            raw = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot read ({exc})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        for key in ("bos_token", "eos_token", "pad_token"):
            value = raw.get(key)
            if value is None:
                continue
            text = value.get("content") if isinstance(value, dict) else value
            if not isinstance(text, str) or not text:
                raise CheckpointError(f"{path}: {key} = {value!r} is not a token")
            special[key] = text
    return special

def _lookup(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 -> normalised float32 for every byte value; the same float32 ops as x / 255, - mean, / std."""
    x = np.arange(256, dtype=np.float32)[:, None] / np.float32(255.0)  # [256, 1]
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)  # [256, 3]


def _normalise(img: Image.Image, table: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 -> [3, H, W] float32 through the per-channel lookup table."""
    idx = np.asarray(img, dtype=np.uint8)
    out = np.empty((3, *idx.shape[:2]), np.float32)
    for c in range(3):
        out[c] = table[idx[..., c], c]
    return out




@dataclass
class PageViews:
    """A page cut ahead of the model for one family's processor (in the rendering thread): DeepSeek-VL2's Tiling,
    DeepSeek-OCR's views."""


@dataclass
class Message:
    role: str  # "user" | "assistant" | "system"
    content: Content  # `<image>` in template pieces marks where each image goes
    images: list[Image.Image | PageViews] = field(default_factory=list)


@dataclass
class Prepared:
    """One prompt ready for the model."""

    prompt: str
    input_ids: list[int]
    image_mask: list[bool]
    pixels: np.ndarray  # [n_tiles, 3, S, S] (n_tiles may be 0)
    spatial_crop: list[list[int]]  # [tiles_wide, tiles_high] per image
    views: OcrViews | None = None  # DeepSeek-OCR and DeepSeek-OCR 2: the page's views instead of `pixels`



# ------------------------------------------------------------------------------- DeepSeek-OCR and DeepSeek-OCR 2
# Both cut a page the same way (a padded global view, and 2-6 tiles resized without padding, nearest the page's
# aspect) and prompt it raw (no chat template); only the sizes differ (engine/ocr/, engine/ocr2/).


@dataclass
class OcrViews(PageViews):
    global_pixels: np.ndarray  # [1, 3, B, B] float32, normalised
    local_pixels: np.ndarray | None  # [n, 3, T, T] (T = 640, or 768 for OCR 2), row by row; None: not tiled
    tiles_wide: int
    tiles_high: int
    # DeepSeek-OCR's resolution mode they were cut in (it decides the prompt's image tokens); keyword-only, so that
    # subclasses' own fields need no defaults
    mode: str = field(default="", kw_only=True)


def tile_grid(width: int, height: int, min_crops: int, max_crops: int, tile: int) -> tuple[int, int]:
    """The tile grid (columns, rows) whose aspect ratio is nearest the image's; on an exact tie the later ratio
    wins when the image has more than half its pixels (the reference's find_closest_aspect_ratio, DeepSeek-OCR's with
    640-pixel tiles, DeepSeek-OCR 2's with 768)."""
    ratios = {(i, j) for n in range(min_crops, max_crops + 1) for i in range(1, n + 1) for j in range(1, n + 1)
              if min_crops <= i * j <= max_crops}
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for ratio in sorted(ratios, key=lambda r: r[0] * r[1]):  # equal products keep the set's iteration order
        diff = abs(aspect - ratio[0] / ratio[1])
        if diff < best_diff:
            best, best_diff = ratio, diff
        elif diff == best_diff and area > 0.5 * tile * tile * ratio[0] * ratio[1]:
            best = ratio
    return best


def tile_boxes(tile: int, tiles_wide: int, tiles_high: int) -> list[tuple[int, int, int, int]]:
    """Crop boxes (x0, y0, x1, y1) of the tiles, row by row."""
    return [(c * tile, r * tile, (c + 1) * tile, (r + 1) * tile) for r in range(tiles_high) for c in range(tiles_wide)]


def local_tiles(image: Image.Image, tile: int, min_crops: int, max_crops: int,
                table: np.ndarray) -> tuple[np.ndarray | None, int, int]:
    """The page cut into 2..6 tiles (normalised, row by row) and the grid (columns, rows); no tiles (None, 1, 1)
    when the page fits in one tile on both sides."""
    if image.width <= tile and image.height <= tile:
        return None, 1, 1
    tiles_wide, tiles_high = tile_grid(image.width, image.height, min_crops, max_crops, tile)
    canvas = image.resize((tile * tiles_wide, tile * tiles_high))  # no padding: the aspect is distorted
    local = np.stack([_normalise(canvas.crop(box), table) for box in tile_boxes(tile, tiles_wide, tiles_high)])
    return local, tiles_wide, tiles_high


def raw_prompt_ids(tokenizer: VL2Tokenizer, image_token: str, prompt: Content, n: int) -> tuple[list[int], list[bool]]:
    """DeepSeek-OCR's and DeepSeek-OCR 2's prompt ids and image mask: [bos] + the text before the one image mark,
    n image ids, the text after; each piece encoded with its special tokens, no end-of-sentence."""
    parts = [prompt] if isinstance(prompt, str) else list(prompt)
    before: list[str] = []
    after: list[str] = []
    marks = 0
    for part in parts:
        pieces = [part] if isinstance(part, UserText) else part.split(image_token)
        for i, piece in enumerate(pieces):
            if i:
                marks += 1
            (after if marks else before).append(type(part)(piece) if isinstance(part, UserText) else piece)
    if marks != 1:
        raise UsageError(f"a DeepSeek-OCR prompt holds exactly one {image_token} mark, not {marks}")
    head, tail = tokenizer.encode_content(before), tokenizer.encode_content(after)
    ids = [tokenizer.bos_id, *head, *[tokenizer.image_id] * n, *tail]
    mask = [False] * (1 + len(head)) + [True] * n + [False] * len(tail)
    return ids, mask
