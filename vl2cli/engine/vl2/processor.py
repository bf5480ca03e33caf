"""DeepSeek-VL2's prompts: the "deepseek" chat template, dynamic tiling and the image-token layout.

Follows deepseek-ai/DeepSeek-VL2 `deepseek_vl2/models/processing_deepseek_vl_v2.py` (`select_best_resolution`,
`tokenize_with_images`) and `deepseek_vl2/models/conversation.py` (the "deepseek" template). The tokenizer and the
text-as-data rule are engine/processor.py's.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from vl2cli.engine.processor import (
    ASSISTANT,
    EOS_TEXT,
    USER,
    Content,
    Message,
    PageViews,
    Prepared,
    UserText,
    VL2Tokenizer,
    _lookup,
    _normalise,
    content_text,
)
from vl2cli.engine.vl2.config import VL2Config
from vl2cli.errors import UsageError


def select_best_resolution(size: tuple[int, int], candidates: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The candidate that shows the most image pixels; ties go to the least padding, then list order."""
    width, height = size
    best, best_effective, best_wasted = candidates[0], 0, float("inf")
    for cw, ch in candidates:
        scale = min(cw / width, ch / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cw * ch - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (cw, ch), effective, wasted
    return best


@dataclass
class Tiling(PageViews):
    """One image's tiles: the global view first, then local tiles row by row."""

    pixels: np.ndarray  # [1 + tiles_wide * tiles_high, 3, S, S] float32, normalised
    tiles_wide: int
    tiles_high: int
    cropping: bool = True
    source: Image.Image | None = None  # kept so a prompt with 3+ images can re-tile without cropping

_POOL: ThreadPoolExecutor | None = None


def _side_pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vl2-tile")
    return _POOL


def tile_image(image: Image.Image, cfg: VL2Config, cropping: bool = True) -> Tiling:
    size = cfg.vision.image_size
    image.load()  # decode now: a lazily opened file must not be decoded by two threads at once below
    if image.mode != "RGB":
        image = image.convert("RGB")
    best_w, best_h = select_best_resolution(image.size, cfg.candidate_resolutions) if cropping else (size, size)
    fill = tuple(int(m * 255) for m in cfg.image_mean)
    table = _lookup(cfg.image_mean, cfg.image_std)
    # The two resizes are independent and Pillow releases the GIL while resampling: run them side by side.
    global_view = _side_pool().submit(lambda: _normalise(ImageOps.pad(image, (size, size), color=fill), table))
    canvas = _normalise(ImageOps.pad(image, (best_w, best_h), color=fill), table)  # [3, best_h, best_w]
    views = [global_view.result()]
    for top in range(0, best_h, size):
        for left in range(0, best_w, size):
            views.append(canvas[:, top:top + size, left:left + size])
    return Tiling(np.stack(views), best_w // size, best_h // size, cropping, image)


def image_token_count(cfg: VL2Config, tiles_wide: int, tiles_high: int) -> int:
    """Global view h*(w+1), one separator, then (th*h) rows of (tw*w + 1) local tokens."""
    h = w = cfg.tokens_per_tile_side
    return h * (w + 1) + 1 + (tiles_high * h) * (tiles_wide * w + 1)


def render_prompt(messages: list[Message], system_prompt: str = "") -> str:
    """The conversation string of the 'deepseek' template (what the model's prompt reads as text)."""
    ret = system_prompt + "\n\n" if system_prompt else ""
    turns = [m for m in messages if m.role != "system"]
    for i, m in enumerate(turns):
        role = USER if m.role == "user" else ASSISTANT
        text = content_text(m.content).strip()
        ret += f"{role}: {text}" + ("\n\n" if i % 2 == 0 else EOS_TEXT) if text else f"{role}:"
    if not turns or turns[-1].role == "user":
        ret += f"{ASSISTANT}:"
    return ret.strip()


def _add_text(state: dict, ids: list[int]) -> None:
    state["ids"] += ids
    state["mask"] += [False] * len(ids)


def _strip(parts: list[str]) -> list[str]:
    """The reference strips each message of surrounding white space; do so across the pieces, keeping their kinds."""
    out = list(parts)
    while out and not out[0].strip():
        out.pop(0)
    while out and not out[-1].strip():
        out.pop()
    if out:
        out[0] = type(out[0])(out[0].lstrip())
        out[-1] = type(out[-1])(out[-1].rstrip())
    return out


class Processor:
    def __init__(self, tokenizer: VL2Tokenizer, cfg: VL2Config):
        self.tokenizer = tokenizer
        self.cfg = cfg

    def _user_turn(self, content: Content, images: Sequence[Image.Image | PageViews], cropping: bool,
                   state: dict) -> None:
        """Tokenise one user turn; images may come pre-tiled (the rendering thread tiles ahead)."""
        token = self.cfg.image_token
        parts = _strip([content] if isinstance(content, str) else list(content))
        parts = [USER + ": ", *parts, "\n\n" + ASSISTANT + ":"]
        # Split at the template's image marks only: a mark inside UserText is text.
        segments: list[list[str]] = [[]]
        for part in parts:
            pieces = [part] if isinstance(part, UserText) else part.split(token)
            segments[-1].append(pieces[0])
            segments.extend([p] for p in pieces[1:])
        if len(segments) - 1 != len(images):
            raise UsageError(f"the prompt has {len(segments) - 1} {token} marks but {len(images)} images were given")
        for i, segment in enumerate(segments):
            _add_text(state, self.tokenizer.encode_content(segment))
            if i < len(images):
                self._add_image(images[i], cropping, state)

    def _add_image(self, image: Image.Image | PageViews, cropping: bool, state: dict) -> None:
        if isinstance(image, Tiling):
            tiling = image if image.cropping == cropping or image.source is None else tile_image(image.source,
                                                                                                  self.cfg, cropping)
        elif isinstance(image, Image.Image):
            tiling = tile_image(image, self.cfg, cropping)
        else:
            raise UsageError(f"DeepSeek-VL2 cannot read a page cut for another model ({type(image).__name__})")
        n = image_token_count(self.cfg, tiling.tiles_wide, tiling.tiles_high)
        state["ids"] += [self.tokenizer.image_id] * n
        state["mask"] += [True] * n
        state["pixels"].append(tiling.pixels)
        state["crop"].append([tiling.tiles_wide, tiling.tiles_high])

    def prepare(self, messages: list[Message], system_prompt: str = "", mode: str | None = None) -> Prepared:
        """Tokenise a conversation as the official processor does, message by message (`mode`: DeepSeek-OCR's
        resolution mode, which DeepSeek-VL2 has no use for).

        Each user turn is tokenised as `<|User|>: {text}\\n\\n<|Assistant|>:`; earlier assistant
        turns as their text plus the end-of-sentence id. Tiling happens only with <= 2 images.
        A system prompt (an argument or a leading system message) appears in the rendered prompt string
        only: the official processor builds the ids from the template's own, empty, system message.
        """
        del mode
        if not messages or messages[-1].role != "user":
            raise UsageError("a conversation must end with a user message")
        if messages[0].role == "system":
            system_prompt = system_prompt or content_text(messages[0].content)
            messages = messages[1:]
        images = [img for m in messages for img in m.images]
        cropping = len(images) <= 2
        state: dict = {"ids": [self.tokenizer.bos_id], "mask": [False], "pixels": [], "crop": []}
        for m in messages:
            if m.role == "user":
                self._user_turn(m.content, m.images, cropping, state)
            elif m.role == "assistant":
                if m.images or self.cfg.image_token in content_text(m.content):
                    raise UsageError("assistant turns cannot carry images")
                text = _strip([m.content] if isinstance(m.content, str) else list(m.content))
                _add_text(state, [*self.tokenizer.encode_content(text), self.tokenizer.eos_id])
            elif m.role == "system":
                raise UsageError("a system message may only open the conversation")
            else:
                raise UsageError(f"unknown message role {m.role!r}")
        size = self.cfg.vision.image_size
        pixels = np.concatenate(state["pixels"]) if state["pixels"] else np.zeros((0, 3, size, size), np.float32)
        return Prepared(render_prompt(messages, system_prompt.strip()), state["ids"], state["mask"], pixels,
                        state["crop"])

    def prepare_prompt(self, prompt: Content, images: Sequence[Image.Image | PageViews], system_prompt: str = "",
                       mode: str | None = None) -> Prepared:
        return self.prepare([Message("user", prompt, list(images))], system_prompt, mode)

    def tile(self, image: Image.Image, mode: str | None = None) -> Tiling:
        """A page's tiles, cut ahead of the model (in the rendering thread); DeepSeek-VL2 has one way (no modes)."""
        del mode
        return tile_image(image, self.cfg)
