"""Engine behaviour beyond the golden traces: caching, batching, routing variants, strict loading, quantization."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import CKPT, make_checkpoint
from vl2cli.engine.generation import Engine, SamplingParams
from vl2cli.engine.loading import load_model
from vl2cli.engine.scheduler import generate
from vl2cli.engine.vl2.config import config_from_dict, load_config
from vl2cli.errors import CheckpointError, ConfigError

VARIANTS = {
    "mha": ("tiny", {}),
    "mla": ("small", {}),
    "mla-q-lora": ("small", {"q_lora_rank": 24}),
    "group-limited": ("small", {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}),
    "noaux-groups": ("base", {"n_group": 2, "topk_group": 1}),
    "yarn": ("base", {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
                                       "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}}),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    base, lang = VARIANTS[request.param]
    folder = make_checkpoint(tmp_path_factory.mktemp(request.param), base, seed=3, language=lang)
    return load_model(str(folder), device="cpu", dtype="float32", quant="none")


def _prompt(loaded, image, text="<image>\nRead it."):
    return loaded.processor.prepare_prompt(text, [image])


def test_cached_decoding_equals_full_recomputation(variant, page_image):
    """Logits of each decode step equal the logits of running the whole sequence again from scratch."""
    engine = Engine(variant.model, variant.processor.tokenizer.eos_id, variant.processor.tokenizer.pad_id)
    prompt = _prompt(variant, page_image)
    steps: list[torch.Tensor] = []
    gen = generate(engine, [prompt], SamplingParams(max_new_tokens=6), on_logits=lambda _r, x: steps.append(x.clone()))[0]
    ids = gen.ids[:-1] if gen.ids[-1] == engine.eos_id else gen.ids
    full = type(prompt)(prompt.prompt, prompt.input_ids + ids, prompt.image_mask + [False] * len(ids),
                        prompt.pixels, prompt.spatial_crop)
    all_logits, _ = engine.prefill([full], 0, all_logits=True)
    recomputed = all_logits[0, len(prompt.input_ids) - 1:].argmax(-1).tolist()
    assert recomputed[: len(ids)] == ids
    # every step's logits from the slot cache equal the full recomputation's at that position
    n = len(prompt.input_ids)
    torch.testing.assert_close(torch.stack(steps[: len(ids)]), all_logits[0, n - 1:n - 1 + len(ids)],
                               atol=2e-4, rtol=1e-4)
    # step logits themselves: compare the first decode step with the recomputed position
    _logits, cache = engine.prefill([prompt], 4)
    with torch.inference_mode():
        lm = variant.model.language
        step = lm.logits(lm(lm.embed_tokens(torch.tensor([[ids[0]]])), cache))
    torch.testing.assert_close(step[0, -1], all_logits[0, len(prompt.input_ids)], atol=2e-4, rtol=1e-4)


def test_chunked_prefill_matches_single_pass(variant, page_image):
    tok = variant.processor.tokenizer
    prompt = _prompt(variant, page_image)
    whole, _ = Engine(variant.model, tok.eos_id, tok.pad_id).prefill([prompt], 0, all_logits=True)
    chunked, _ = Engine(variant.model, tok.eos_id, tok.pad_id, prefill_chunk=100).prefill([prompt], 0, all_logits=True)
    torch.testing.assert_close(chunked, whole, atol=2e-4, rtol=1e-4)


def test_batched_generation_equals_one_by_one(variant, page_image):
    from PIL import Image
    tok = variant.processor.tokenizer
    engine = Engine(variant.model, tok.eos_id, tok.pad_id)
    small = Image.open(CKPT.parent / "images" / "note_300x200.png")
    prompts = [_prompt(variant, page_image), _prompt(variant, small, "<image>\nWhat is the total amount?"),
               variant.processor.prepare_prompt("Hello there, how are you?", [])]
    params = SamplingParams(max_new_tokens=8)
    alone = [generate(engine, [p], params)[0].ids for p in prompts]
    together = [g.ids for g in generate(engine, prompts, params)]
    assert together == alone


def test_sampling_is_reproducible_with_a_seed(loaded_tiny, page_image):
    tok = loaded_tiny.processor.tokenizer
    engine = Engine(loaded_tiny.model, tok.eos_id, tok.pad_id)
    prompt = _prompt(loaded_tiny, page_image)
    params = SamplingParams(max_new_tokens=8, temperature=0.7, top_p=0.9, repetition_penalty=1.2, seed=11)
    first = generate(engine, [prompt], params)[0].ids
    assert generate(engine, [prompt], params)[0].ids == first
    streamed = []
    generate(engine, [prompt], params, on_token=lambda row, t: streamed.append(t))
    assert streamed == first


def test_repetition_penalty_changes_a_looping_answer(loaded_tiny, page_image):
    tok = loaded_tiny.processor.tokenizer
    engine = Engine(loaded_tiny.model, tok.eos_id, tok.pad_id)
    prompt = _prompt(loaded_tiny, page_image)
    plain = generate(engine, [prompt], SamplingParams(max_new_tokens=12))[0].ids
    penalised = generate(engine, [prompt], SamplingParams(max_new_tokens=12, repetition_penalty=5.0))[0].ids
    assert len(set(plain)) == 1 and len(set(penalised)) > 1


def test_missing_tensor_is_named(tmp_path):
    name = "language.model.layers.1.mlp.experts.3.up_proj.weight"
    folder = make_checkpoint(tmp_path / "ck", "tiny", drop=(name,))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_model(str(folder), device="cpu", dtype="float32", quant="none")


def test_misshaped_tensor_is_named(tmp_path):
    name = "language.model.layers.0.self_attn.q_proj.weight"
    folder = make_checkpoint(tmp_path / "ck", "tiny", extra_tensors={name: torch.zeros(64, 63)})
    with pytest.raises(CheckpointError, match=r"q_proj\.weight has shape \[64, 63\], config implies \[64, 64\]"):
        load_model(str(folder), device="cpu", dtype="float32", quant="none")


def test_unexpected_tensor_is_refused(tmp_path):
    folder = make_checkpoint(tmp_path / "ck", "tiny", extra_tensors={"language.model.layers.9.foo": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"layers\.9\.foo"):
        load_model(str(folder), device="cpu", dtype="float32", quant="none")


def test_sharded_checkpoint_loads_like_single_file(tmp_path, loaded_tiny):
    from safetensors import safe_open
    folder = tmp_path / "sharded"
    folder.mkdir()
    for f in (CKPT / "tiny").glob("*.json"):
        (folder / f.name).write_text(f.read_text())
    with safe_open(str(CKPT / "tiny" / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(folder / shard))
        weight_map.update(dict.fromkeys(keys, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    sharded = load_model(str(folder), device="cpu", dtype="float32", quant="none")
    for (name, a), (_, b) in zip(sharded.model.state_dict().items(), loaded_tiny.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_pickle_weights_are_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    for f in (CKPT / "tiny").glob("*.json"):
        (folder / f.name).write_text(f.read_text())
    (folder / "pytorch_model.bin").write_bytes(b"not even opened")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_model(str(folder), device="cpu", dtype="float32", quant="none")


@pytest.mark.parametrize("field,value,match", [
    ("topk_method", "random_pick", "topk_method"),
    ("scoring_func", "relu", "scoring_func"),
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}, "only YaRN"),
    ("hidden_act", "gelu", "hidden_act"),
    ("num_experts_per_tok", 99, "num_experts_per_tok"),
])
def test_unsupported_config_values_fail_clearly(field, value, match):
    raw = json.loads((CKPT / "small" / "config.json").read_text())
    raw["language_config"][field] = value
    with pytest.raises(ConfigError, match=match):
        config_from_dict(raw)


def test_group_routing_needs_groups():
    raw = json.loads((CKPT / "tiny" / "config.json").read_text())
    raw["language_config"].update(topk_method="group_limited_greedy", n_group=3)
    with pytest.raises(ConfigError, match="n_group"):
        config_from_dict(raw)


def test_missing_language_fields_take_official_defaults(tmp_path):
    raw = json.loads((CKPT / "small" / "config.json").read_text())
    del raw["language_config"]["q_lora_rank"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert load_config(tmp_path).language.q_lora_rank == 1536  # DeepseekV2Config's default


def test_gate_masks_unselected_groups_to_zero_not_minus_inf():
    from vl2cli.engine.config import LanguageConfig, moe_shape
    from vl2cli.engine.moe import Gate
    cfg = LanguageConfig(hidden_size=2, n_routed_experts=4, num_experts_per_tok=3, n_group=2, topk_group=1,
                         topk_method="group_limited_greedy", scoring_func="sigmoid")
    gate = Gate(2, moe_shape(cfg))
    # logits make group 0 = experts {0, 1} the best group; top-3 must then pick a masked 0.0 expert too
    gate.weight.data = torch.tensor([[4.0, 0.0], [3.0, 0.0], [-9.0, 0.0], [-8.0, 0.0]])
    idx, weight = gate(torch.tensor([[1.0, 0.0]]))
    assert set(idx[0, :].tolist()) >= {0, 1}
    assert sorted(weight[0].tolist())[0] == 0.0


@pytest.fixture(scope="module")
def quantized_tiny():
    pytest.importorskip("bitsandbytes")
    return load_model(str(CKPT / "tiny"), device="cpu", dtype="float32", quant="nf4")


def test_nf4_quantizes_every_language_linear_on_cpu(quantized_tiny, loaded_tiny, page_image):
    from testkit import is_quantized_module, linear_bytes
    model = quantized_tiny.model
    for name, module in model.named_modules():
        if name.startswith("language.layers.") and (isinstance(module, torch.nn.Linear) or is_quantized_module(module)):
            assert is_quantized_module(module), f"{name} was not quantized"
    experts = [n for n, m in model.named_modules() if ".experts." in n and is_quantized_module(m)]
    cfg = quantized_tiny.cfg.language
    assert len(experts) == 3 * cfg.n_routed_experts * (cfg.num_hidden_layers - cfg.first_k_dense_replace)
    assert isinstance(model.language.lm_head, torch.nn.Linear) and isinstance(model.vision.blocks[0].mlp.fc1,
                                                                              torch.nn.Linear)
    q = linear_bytes(model)["quantizable_linear_bytes"]
    full = linear_bytes(loaded_tiny.model)["quantizable_linear_bytes"]
    assert q / (full / 2) <= 0.30  # vs the same layers in 16-bit
    tok = quantized_tiny.processor.tokenizer
    prompt = quantized_tiny.processor.prepare_prompt("<image>\nRead it.", [page_image])
    lq, _ = Engine(model, tok.eos_id, tok.pad_id).prefill([prompt], 0)
    lf, _ = Engine(loaded_tiny.model, tok.eos_id, tok.pad_id).prefill([prompt], 0)
    cos = torch.nn.functional.cosine_similarity(lq, lf).item()
    assert cos > 0.98, cos


def test_cpu_auto_dtype_falls_back_to_bfloat16_when_float32_would_not_fit(monkeypatch, caplog):
    import psutil

    class Tight:
        available = 1024  # bytes: nothing fits
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tight())
    loaded = load_model(str(CKPT / "tiny"), device="cpu", quant="none")
    assert loaded.model.language.embed_tokens.weight.dtype == torch.bfloat16
    assert "using bfloat16" in caplog.text  # the library logs; the CLI decides what reaches stderr
    exact = load_model(str(CKPT / "tiny"), device="cpu", dtype="float32", quant="none")
    assert exact.model.language.embed_tokens.weight.dtype == torch.float32


def _config_dir(tmp_path: Path, edit) -> Path:
    """The tiny parity checkpoint's JSON files, edited (weights are never reached: config checks come first)."""
    import shutil
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for f in (CKPT / "tiny").glob("*.json"):
        shutil.copy(f, folder / f.name)
    raw = json.loads((folder / "config.json").read_text())
    proc = json.loads((folder / "processor_config.json").read_text())
    edit(raw, proc, folder)
    (folder / "config.json").write_text(json.dumps(raw))
    (folder / "processor_config.json").write_text(json.dumps(proc))
    return folder


def _lang(key, value):
    return lambda raw, proc, folder: raw["language_config"].__setitem__(key, value)


HOSTILE_CONFIGS = {
    "n_routed_experts": (_lang("n_routed_experts", 50_000_000), "n_routed_experts = 50000000: outside the sane"),
    "canvas": (lambda raw, proc, folder: proc.__setitem__("candidate_resolutions", [[9984, 9984]]),
               "[9984, 9984] is over the 6144-pixel"),
    "hidden_size 0": (_lang("hidden_size", 0), "hidden_size = 0: outside the sane range"),
    "string": (_lang("num_hidden_layers", "12"), "num_hidden_layers = '12': expected an integer"),
    "float layers": (_lang("num_hidden_layers", 2.5), "num_hidden_layers = 2.5: expected an integer"),
    "one number": (lambda raw, proc, folder: proc.__setitem__("candidate_resolutions", [[384]]),
                   "entry [384]: expected [width, height]"),
    "image_size 0": (lambda raw, proc, folder: raw["vision_config"].__setitem__("image_size", 0),
                     "vision_config.image_size = 0"),
    "image_std": (lambda raw, proc, folder: proc.__setitem__("image_std", [0, 0, 0]),
                  "image_std = [0, 0, 0]: expected three positive numbers"),
    "special tokens": (lambda raw, proc, folder: (folder / "special_tokens_map.json").write_text("{not json"),
                       "special_tokens_map.json: cannot read"),
    "tied": (_lang("tie_word_embeddings", True), "tied embeddings are not supported"),
    "vocab": (_lang("vocab_size", "big"), "vocab_size = 'big': expected an integer"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_CONFIGS))
def test_hostile_configs_fail_at_once_naming_file_and_field(tmp_path, case):
    import time

    from vl2cli.engine.loading import load_model
    edit, words = HOSTILE_CONFIGS[case]
    folder = _config_dir(tmp_path, edit)
    start = time.perf_counter()
    with pytest.raises((ConfigError, CheckpointError)) as caught:
        load_model(str(folder), device="cpu", dtype="float32", quant="none")
    assert words in str(caught.value) and str(folder) in str(caught.value)
    assert time.perf_counter() - start < 5  # refused before building anything


def test_unknown_config_keys_are_warned_about_known_ones_are_not(tmp_path):
    import warnings

    from vl2cli.engine.vl2.config import load_config
    folder = _config_dir(tmp_path, _lang("mystery_switch", 1))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        load_config(folder)
    assert [str(w.message) for w in seen] == ["config.json: unknown key(s) language_config.mystery_switch ignored"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(CKPT / "tiny")  # the official layout's own extra keys are known
