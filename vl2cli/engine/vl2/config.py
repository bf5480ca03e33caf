"""DeepSeek-VL2's configuration: the SigLIP tower and downsample-MLP projector of the official config.json, its
tiling (candidate resolutions, processor_config.json), and the real-size presets of the three published variants.

Follows deepseek-ai/DeepSeek-VL2 `deepseek_vl2/models/configuration_deepseek.py` (commit 1d57bba) and the
VisionConfig/MlpProjectorConfig of `modeling_deepseek_vl_v2.py`; the decoder's part is engine/config.py's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from vl2cli.engine.config import (
    LanguageConfig,
    pick,
    read_json_object,
    validate_language,
    warn_unknown,
)
from vl2cli.errors import ConfigError


@dataclass(frozen=True)
class VisionConfig:
    image_size: int = 384
    patch_size: int = 14
    width: int = 1152
    layers: int = 27
    heads: int = 16
    mlp_ratio: float = 3.7362

    @property
    def grid(self) -> int:  # patches per side: 384 // 14 = 27
        return self.image_size // self.patch_size

    @property
    def mlp_dim(self) -> int:  # timm truncates: int(1152 * 3.7362) = 4304
        return int(self.width * self.mlp_ratio)


@dataclass(frozen=True)
class ProjectorConfig:
    input_dim: int = 1152
    n_embed: int = 1280
    depth: int = 2
    mlp_ratio: int = 1
    downsample_ratio: int = 2


@dataclass(frozen=True)
class VL2Config:
    kind: ClassVar[str] = "vl2"
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    candidate_resolutions: tuple[tuple[int, int], ...] = ()
    tile_tag: str = "2D"
    global_view_pos: str = "head"
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_token: str = "<image>"
    pad_token: str = "<｜▁pad▁｜>"

    @property
    def tokens_per_tile_side(self) -> int:  # ceil(27 / 2) = 14 merged tokens per side
        return math.ceil(self.vision.grid / self.projector.downsample_ratio)


MAX_CANVAS_SIDE = 6144  # px: 16 tiles of 384 (the published grids stop at 9 tiles, 3456 px)
MAX_CANVAS_TILES = 36

def _candidates(raw: Any, tile: int) -> tuple[tuple[int, int], ...]:
    """candidate_resolutions: a non-empty list of [w, h] pairs on the tile grid, each a bounded canvas."""
    if not isinstance(raw, list) or not raw or len(raw) > 1024:
        raise ConfigError(f"candidate_resolutions = {str(raw)[:80]}: expected a list of [width, height] pairs")
    out = []
    for entry in raw:
        ok = (isinstance(entry, (list, tuple)) and len(entry) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) for v in entry))
        if not ok:
            raise ConfigError(f"candidate_resolutions entry {entry!r}: expected [width, height] in pixels")
        w, h = entry
        if w <= 0 or h <= 0 or w % tile or h % tile:
            raise ConfigError(f"candidate_resolutions entry {[w, h]} is not a positive multiple of {tile}")
        if max(w, h) > MAX_CANVAS_SIDE or (w // tile) * (h // tile) > MAX_CANVAS_TILES:
            raise ConfigError(f"candidate_resolutions entry {[w, h]} is over the {MAX_CANVAS_SIDE}-pixel, "
                              f"{MAX_CANVAS_TILES}-tile bound (each tile costs ~200 image tokens)")
        out.append((w, h))
    return tuple(out)


def _triple(processor: dict[str, Any], key: str, default: tuple[float, float, float],
            positive: bool) -> tuple[float, float, float]:
    value = processor.get(key, default)
    ok = (isinstance(value, (list, tuple)) and len(value) == 3
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))
    if not ok or (positive and min(value) <= 0):
        need = "three positive numbers" if positive else "three numbers"
        raise ConfigError(f"processor_config.{key} = {value!r}: expected {need}")
    first, second, third = (float(v) for v in value)
    return first, second, third


def _validate_vision_side(vision_raw: dict[str, Any], proj_raw: dict[str, Any], vision: VisionConfig,
                          projector: ProjectorConfig, language: LanguageConfig) -> None:
    if vision_raw.get("class_token"):
        raise ConfigError("vision_config.class_token = true: the SigLIP tower without class token is supported")
    ptype = proj_raw.get("projector_type", "downsample_mlp_gelu")
    if ptype != "downsample_mlp_gelu":
        raise ConfigError(f"projector_config.projector_type = {ptype!r}: only 'downsample_mlp_gelu' is supported")
    if proj_raw.get("token_pooling"):
        raise ConfigError("projector_config.token_pooling = true is not supported")
    if projector.input_dim != vision.width:
        raise ConfigError(f"projector_config.input_dim = {projector.input_dim} does not match vision width {vision.width}")
    if projector.n_embed != language.hidden_size:
        raise ConfigError(f"projector_config.n_embed = {projector.n_embed} does not match hidden_size {language.hidden_size}")
    if vision.grid < 1 or vision.width % vision.heads:
        raise ConfigError(f"vision_config: image_size {vision.image_size}, patch_size {vision.patch_size}, width "
                          f"{vision.width}, heads {vision.heads} do not make a vision tower")


def config_from_dict(raw: dict[str, Any], processor: dict[str, Any] | None = None) -> VL2Config:
    """Build a VL2Config from the official config.json (and optional processor_config.json) dicts."""
    if raw.get("model_type") not in (None, "deepseek_vl_v2"):
        raise ConfigError(f"model_type = {raw.get('model_type')!r}: not a DeepSeek-VL2 checkpoint")
    vision_raw = raw.get("vision_config") or {}
    proj_raw = raw.get("projector_config") or {}
    lang_raw = raw.get("language_config")
    if not isinstance(lang_raw, dict):
        raise ConfigError("config.json has no language_config section")
    vision = pick(VisionConfig, vision_raw, "vision_config")
    projector = pick(ProjectorConfig, proj_raw, "projector_config")
    language = pick(LanguageConfig, lang_raw, "language_config")
    _validate_vision_side(vision_raw, proj_raw, vision, projector, language)
    validate_language(language)
    tile_tag = raw.get("tile_tag", "2D")
    if tile_tag != "2D":
        raise ConfigError(f"tile_tag = {tile_tag!r}: only '2D' tiling is supported")
    view_pos = raw.get("global_view_pos", "head")
    if view_pos not in ("head", "tail"):
        raise ConfigError(f"global_view_pos = {view_pos!r}: expected 'head' or 'tail'")
    processor = processor or {}
    if not isinstance(processor, dict):
        raise ConfigError("processor_config.json: expected an object")
    warn_unknown("", raw, set())
    cands = _candidates(processor.get("candidate_resolutions") or raw.get("candidate_resolutions")
                        or [[vision.image_size] * 2], vision.image_size)
    for key, size in (("patch_size", vision.patch_size), ("downsample_ratio", projector.downsample_ratio)):
        if key in processor and processor[key] != size:
            raise ConfigError(f"processor_config.{key} = {processor[key]} disagrees with config.json ({size})")
    return VL2Config(
        vision=vision,
        projector=projector,
        language=language,
        candidate_resolutions=cands,
        tile_tag=tile_tag,
        global_view_pos=view_pos,
        image_mean=_triple(processor, "image_mean", (0.5, 0.5, 0.5), positive=False),
        image_std=_triple(processor, "image_std", (0.5, 0.5, 0.5), positive=True),
        image_token=_token(processor, "image_token", "<image>"),
        pad_token=_token(processor, "pad_token", "<｜▁pad▁｜>"),
    )


def _token(processor: dict[str, Any], key: str, default: str) -> str:
    value = processor.get(key, default)
    if not isinstance(value, str) or not value or len(value) > 64:
        raise ConfigError(f"processor_config.{key} = {value!r}: expected a short token string")
    return value


def load_config(folder: str | Path, raw: dict[str, Any] | None = None) -> VL2Config:
    """A DeepSeek-VL2 checkpoint folder's config (config.json, and processor_config.json where there is one);
    `raw`: its config.json, already read. engine.family.read_config reads any family's checkpoint."""
    folder = Path(folder)
    path = folder / "config.json"
    if raw is None:
        raw = read_json_object(path)
    proc_path = folder / "processor_config.json"
    processor = read_json_object(proc_path) if proc_path.exists() else None
    try:
        return config_from_dict(raw, processor)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _all_candidates(max_tiles: int = 9, tile: int = 384) -> tuple[tuple[int, int], ...]:
    # The published order: by tile count, then (w, h) pairs as the official configs list them.
    out: list[tuple[int, int]] = []
    for n in range(1, max_tiles + 1):
        for a in range(1, math.isqrt(n) + 1):
            if n % a == 0:
                out.append((a * tile, n // a * tile))
                if a != n // a:
                    out.append((n // a * tile, a * tile))
    return tuple(out)


_VISION = VisionConfig()
_LANG_COMMON: dict[str, Any] = {
    "first_k_dense_replace": 1, "n_shared_experts": 2, "num_experts_per_tok": 6, "max_position_embeddings": 4096,
    "bos_token_id": 0, "eos_token_id": 1,
}
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "hub_id": "deepseek-ai/deepseek-vl2-tiny", "total_params": 3.37e9, "active_params": 1.0e9,
        "language": LanguageConfig(
            vocab_size=129280, hidden_size=1280, intermediate_size=6848, moe_intermediate_size=896,
            num_hidden_layers=12, num_attention_heads=10, num_key_value_heads=10, n_routed_experts=64,
            use_mla=False, kv_lora_rank=None, q_lora_rank=None, qk_rope_head_dim=0, qk_nope_head_dim=0,
            v_head_dim=0, **_LANG_COMMON),
    },
    "small": {
        "hub_id": "deepseek-ai/deepseek-vl2-small", "total_params": 16.1e9, "active_params": 2.8e9,
        "language": LanguageConfig(
            vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
            num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
            use_mla=True, kv_lora_rank=512, q_lora_rank=None, **_LANG_COMMON),
    },
    "base": {
        "hub_id": "deepseek-ai/deepseek-vl2", "total_params": 27.5e9, "active_params": 4.5e9,
        "language": LanguageConfig(
            vocab_size=129280, hidden_size=2560, intermediate_size=12288, moe_intermediate_size=1536,
            num_hidden_layers=30, num_attention_heads=32, num_key_value_heads=32, n_routed_experts=72,
            use_mla=True, kv_lora_rank=512, q_lora_rank=None, topk_method="noaux_tc", scoring_func="sigmoid",
            n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.0, **_LANG_COMMON),
    },
}


def preset_config(name: str, **language_overrides: Any) -> VL2Config:
    """A real-size config of a published variant (random weights measure speed and memory exactly)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown variant {name!r}: expected one of {', '.join(PRESETS)}")
    lang = replace(PRESETS[name]["language"], **language_overrides)
    validate_language(lang)
    return VL2Config(
        vision=_VISION,
        projector=ProjectorConfig(input_dim=_VISION.width, n_embed=lang.hidden_size),
        language=lang,
        candidate_resolutions=_all_candidates(),
    )

