"""What every family's configuration shares: the DeepSeek-V2 decoder's config (read, bounded, validated), the MLA
and MoE shapes decided once from it, and the reading of config.json's sections.

Follows deepseek-ai/DeepSeek-VL2 `deepseek_vl2/models/configuration_deepseek.py` (commit 1d57bba). Missing language
fields take the defaults of the official DeepseekV2Config; values the model cannot honour raise ConfigError naming the
field, never a silent fallback. A config is input like any other file: every number is bounded before anything is
built from it (a hostile `n_routed_experts: 50000000` must not build 10^8 modules). Each family's own config
(vision side, tiling, presets) lives in its package: engine/vl2/config.py, engine/ocr/config.py, engine/ocr2/config.py.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from vl2cli.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")
T = TypeVar("T", bound="DataclassInstance")

@dataclass(frozen=True)
class LanguageConfig:
    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    n_shared_experts: int | None = None
    n_routed_experts: int | None = None
    num_experts_per_tok: int | None = None
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    n_group: int | None = None
    topk_group: int | None = None
    norm_topk_prob: bool = False
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    use_mla: bool = True
    kv_lora_rank: int | None = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int = 100000
    eos_token_id: int = 100001

    @property
    def head_dim(self) -> int:  # plain MHA: whole head rotated
        return self.hidden_size // self.num_attention_heads

    @property
    def q_head_dim(self) -> int:  # MLA: nope part + rotary part
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, index: int) -> bool:
        return (
            self.n_routed_experts is not None
            and index >= self.first_k_dense_replace
            and index % self.moe_layer_freq == 0
        )

    @property
    def softmax_scale(self) -> float:
        dim = self.q_head_dim if self.use_mla else self.head_dim
        scale = dim**-0.5
        if self.use_mla and self.rope_scaling:
            mscale_all_dim = self.rope_scaling.get("mscale_all_dim", 0)
            if mscale_all_dim:
                from vl2cli.engine.rope import yarn_mscale  # here: config.py stays free of torch (vl2 --help)
                m = yarn_mscale(self.rope_scaling["factor"], mscale_all_dim)
                scale *= m * m
        return scale


@dataclass(frozen=True)
class MlaShape:
    """Multi-head Latent Attention sizes, decided once from a validated config (no Optionals left)."""

    kv_lora_rank: int
    q_lora_rank: int | None  # None: queries come from one q_proj
    nope: int
    rope: int
    v: int


@dataclass(frozen=True)
class MoeShape:
    """Mixture-of-Experts routing, decided once from a validated config."""

    n_routed: int
    n_shared: int
    top_k: int
    topk_method: str
    scoring_func: str
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float


def mla_shape(lc: LanguageConfig) -> MlaShape:
    if not lc.use_mla or not lc.kv_lora_rank:
        raise ConfigError("language_config: not an MLA config (use_mla false)")
    return MlaShape(lc.kv_lora_rank, lc.q_lora_rank, lc.qk_nope_head_dim, lc.qk_rope_head_dim, lc.v_head_dim)


def moe_shape(lc: LanguageConfig) -> MoeShape:
    if not lc.n_routed_experts or not lc.num_experts_per_tok:
        raise ConfigError("language_config: no routed experts (n_routed_experts null)")
    return MoeShape(lc.n_routed_experts, lc.n_shared_experts or 0, lc.num_experts_per_tok, lc.topk_method,
                    lc.scoring_func, lc.n_group or 1, lc.topk_group or 1, lc.norm_topk_prob, lc.routed_scaling_factor)


class FamilyConfig(Protocol):
    """What the loader, the tokenizer, the engine and the memory arithmetic read of any family's config (each family's
    config is a frozen dataclass with these fields; `kind` names its family, see engine/family.py)."""

    kind: ClassVar[str]

    @property
    def language(self) -> LanguageConfig: ...

    @property
    def image_token(self) -> str: ...

    @property
    def pad_token(self) -> str: ...

    @property
    def image_mean(self) -> tuple[float, float, float]: ...

    @property
    def image_std(self) -> tuple[float, float, float]: ...


# Sane bounds for every number a config may set: far above any published model, far below what would
# exhaust memory while building modules or tiling a page.
_BOUNDS: dict[str, tuple[float, float]] = {
    "image_size": (14, 2048), "patch_size": (1, 64), "width": (1, 16384), "layers": (1, 256), "heads": (1, 256),
    "mlp_ratio": (0.1, 64), "input_dim": (1, 16384), "n_embed": (1, 65536), "depth": (1, 16),
    "downsample_ratio": (1, 16), "vocab_size": (2, 1_048_576), "hidden_size": (1, 65536),
    "intermediate_size": (1, 262144), "moe_intermediate_size": (1, 65536), "num_hidden_layers": (1, 512),
    "num_attention_heads": (1, 1024), "num_key_value_heads": (1, 1024), "n_shared_experts": (0, 64),
    "n_routed_experts": (1, 1024), "num_experts_per_tok": (1, 64), "routed_scaling_factor": (0, 1000),
    "n_group": (1, 1024), "topk_group": (1, 1024), "moe_layer_freq": (1, 512), "first_k_dense_replace": (0, 512),
    "kv_lora_rank": (1, 65536), "q_lora_rank": (1, 65536), "qk_rope_head_dim": (0, 4096),
    "qk_nope_head_dim": (0, 4096), "v_head_dim": (0, 4096), "max_position_embeddings": (1, 1_048_576),
    "rms_norm_eps": (0, 1), "rope_theta": (1, 1e12), "bos_token_id": (0, 1_048_576), "eos_token_id": (0, 1_048_576),
}

# Config keys vl2 reads past on purpose (training switches, bookkeeping); any other unknown key is warned about.
KNOWN_IGNORED = {
    "": {"architectures", "model_type", "torch_dtype", "transformers_version", "auto_map", "_name_or_path",
         "vision_config", "projector_config", "language_config", "tile_tag", "global_view_pos",
         "candidate_resolutions", "use_cache"},
    "vision_config": {"model_type", "model_name", "global_pool", "ignore_head", "class_token", "num_classes",
                      "use_checkpoint", "weight_init", "select_layer", "select_feature", "deterministic",
                      "num_recomputing_layers", "torch_dtype"},
    "projector_config": {"model_type", "projector_type", "token_pooling", "torch_dtype"},
    "language_config": {"model_type", "lm_head", "rm_head", "torch_dtype", "aux_loss_alpha", "seq_aux", "ep_size",
                        "pretraining_tp", "use_cache", "initializer_range", "attention_dropout", "pad_token_id",
                        "_attn_implementation", "architectures", "auto_map", "transformers_version", "num_nextn_predict_layers"},
}


def warn_unknown(section: str, raw: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(raw) - known - KNOWN_IGNORED.get(section, set()))
    if unknown:
        where = f"{section}." if section else ""
        warnings.warn(f"config.json: unknown key(s) {', '.join(where + k for k in unknown)} ignored", stacklevel=3)


def _checked_number(where: str, name: str, value: Any, kind: str) -> Any:
    wants_int = kind == "int" or kind.startswith("int ")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (wants_int and not float(value).is_integer()):
        raise ConfigError(f"{where}.{name} = {value!r}: expected {'an integer' if wants_int else 'a number'}")
    if not math.isfinite(value):
        raise ConfigError(f"{where}.{name} = {value!r}: expected a finite number")
    low, high = _BOUNDS.get(name, (-math.inf, math.inf))
    if not low <= value <= high:
        raise ConfigError(f"{where}.{name} = {value!r}: outside the sane range {low:g}..{high:g}")
    return int(value) if wants_int else float(value)


def pick(cls: type[T], raw: object, where: str) -> T:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} = {raw!r}: expected an object")
    nullable = _NULLABLE.get(cls, ())
    known = {f.name for f in fields(cls)}
    warn_unknown(where, raw, known)
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in raw or (raw[f.name] is None and f.name not in nullable):
            continue
        value = raw[f.name]
        if value is not None and f.type in ("int", "float", "int | None", "float | None"):
            value = _checked_number(where, f.name, value, str(f.type))
        elif value is not None and f.type == "bool" and not isinstance(value, bool):
            raise ConfigError(f"{where}.{f.name} = {value!r}: expected true or false")
        elif value is not None and f.type == "str" and not isinstance(value, str):
            raise ConfigError(f"{where}.{f.name} = {value!r}: expected a string")
        values[f.name] = value
    return cls(**values)


_NULLABLE: dict[type, tuple[str, ...]] = {
    LanguageConfig: ("q_lora_rank", "kv_lora_rank", "n_shared_experts", "n_routed_experts",
                     "num_experts_per_tok", "n_group", "topk_group", "rope_scaling"),
}


def _fail(lc: LanguageConfig, name: str, why: str) -> ConfigError:
    return ConfigError(f"language_config.{name} = {getattr(lc, name)!r}: {why}")


def validate_language(lc: LanguageConfig) -> None:
    if lc.hidden_act != "silu":
        raise _fail(lc, "hidden_act", "only 'silu' is supported")
    if lc.tie_word_embeddings:
        raise _fail(lc, "tie_word_embeddings", "DeepSeek-VL2 checkpoints carry their own lm_head; tied embeddings "
                    "are not supported")
    if lc.num_attention_heads <= 0 or lc.hidden_size % lc.num_attention_heads:
        raise _fail(lc, "num_attention_heads", "must divide hidden_size")
    if lc.bos_token_id >= lc.vocab_size or lc.eos_token_id >= lc.vocab_size:
        raise _fail(lc, "eos_token_id", f"begin/end token ids must lie inside vocab_size {lc.vocab_size}")
    if lc.use_mla:
        _validate_mla(lc)
    elif lc.num_attention_heads % lc.num_key_value_heads:
        raise _fail(lc, "num_key_value_heads", "must divide num_attention_heads")
    _validate_rope_scaling(lc)
    if lc.n_routed_experts is not None:
        _validate_moe(lc, lc.n_routed_experts)


def _validate_mla(lc: LanguageConfig) -> None:
    if not lc.kv_lora_rank or lc.kv_lora_rank <= 0:
        raise _fail(lc, "kv_lora_rank", "MLA (use_mla true) needs a positive kv_lora_rank")
    if lc.qk_rope_head_dim <= 0 or lc.qk_rope_head_dim % 2:
        raise _fail(lc, "qk_rope_head_dim", "must be a positive even number under MLA")
    if lc.v_head_dim <= 0:
        raise _fail(lc, "v_head_dim", "must be positive under MLA")
    if lc.q_lora_rank is not None and lc.q_lora_rank <= 0:
        raise _fail(lc, "q_lora_rank", "must be null or positive")


def _validate_rope_scaling(lc: LanguageConfig) -> None:
    if lc.rope_scaling is None:
        return
    if not isinstance(lc.rope_scaling, dict):
        raise _fail(lc, "rope_scaling", "expected an object or null")
    kind = lc.rope_scaling.get("type", lc.rope_scaling.get("rope_type"))
    if kind != "yarn":
        raise ConfigError(f"language_config.rope_scaling.type = {kind!r}: only YaRN scaling is supported")
    if not lc.use_mla:
        raise ConfigError("language_config.rope_scaling: YaRN is only defined for MLA attention (use_mla true)")
    factor = lc.rope_scaling.get("factor")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not 0 < factor <= 1024:
        raise ConfigError(f"language_config.rope_scaling.factor = {factor!r}: expected a number in (0, 1024]")


def _validate_moe(lc: LanguageConfig, n_routed: int) -> None:
    if lc.topk_method not in TOPK_METHODS:
        raise _fail(lc, "topk_method", f"expected one of {', '.join(TOPK_METHODS)}")
    if lc.scoring_func not in SCORING_FUNCS:
        raise _fail(lc, "scoring_func", f"expected one of {', '.join(SCORING_FUNCS)}")
    if not lc.num_experts_per_tok or not 0 < lc.num_experts_per_tok <= n_routed:
        raise _fail(lc, "num_experts_per_tok", "must be between 1 and n_routed_experts")
    if lc.moe_layer_freq <= 0:
        raise _fail(lc, "moe_layer_freq", "must be positive")
    if lc.topk_method == "greedy":
        return
    if not lc.n_group or n_routed % lc.n_group:
        raise _fail(lc, "n_group", f"{lc.topk_method} needs n_group dividing n_routed_experts")
    if not lc.topk_group or not 0 < lc.topk_group <= lc.n_group:
        raise _fail(lc, "topk_group", "must be between 1 and n_group")
    if lc.topk_method == "noaux_tc" and n_routed // lc.n_group < 2:
        raise _fail(lc, "n_group", "noaux_tc scores groups by their two best experts: need >= 2 experts per group")


def linear_projector_language(raw: dict[str, Any], model: str, model_type: str, projector_input: int) -> LanguageConfig:
    """The decoder of a checkpoint whose encoder sits behind a linear projector (DeepSeek-OCR and DeepSeek-OCR 2),
    once that projector is known to map the encoder's `projector_input` channels to the decoder's width. The official
    checkpoints say model_type `deepseek_vl_v2` (engine.family remaps it by their architectures); `model_type` is
    the family's own name for it."""
    if raw.get("model_type") not in (None, "deepseek_vl_v2", model_type):
        raise ConfigError(f"model_type = {raw.get('model_type')!r}: not a {model} checkpoint")
    language = pick(LanguageConfig, raw.get("language_config"), "language_config")
    validate_language(language)
    projector = raw.get("projector_config") or {}
    if not isinstance(projector, dict) or projector.get("projector_type", "linear") != "linear":
        raise ConfigError(f"projector_config.projector_type = {projector.get('projector_type')!r}: {model}'s "
                          "projector is 'linear'")
    if (projector.get("input_dim", projector_input) != projector_input
            or projector.get("n_embed", language.hidden_size) != language.hidden_size):
        raise ConfigError(f"projector_config: input_dim {projector.get('input_dim')} / n_embed "
                          f"{projector.get('n_embed')}: {model} projects {projector_input} channels to hidden_size "
                          f"{language.hidden_size}")
    return language


def read_json_object(path: Path, what: str = "") -> dict[str, Any]:
    """A JSON object from a checkpoint file, or ConfigError naming the file and what is wrong."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no {what or path.name} in the checkpoint folder") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return raw

