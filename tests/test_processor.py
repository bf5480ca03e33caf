"""Prompt template and token layout beyond the single-turn golden cases."""

from __future__ import annotations

from PIL import Image

from vl2cli.engine.processor import Message, image_token_count


def test_multi_turn_tokens_follow_the_official_processor(loaded_tiny):
    proc = loaded_tiny.processor
    tok = proc.tokenizer
    img = Image.new("RGB", (300, 200), "white")
    messages = [Message("user", " <image>\nWhat is this? ", [img]), Message("assistant", " A note. "),
                Message("user", "And the total?")]
    prepared = proc.prepare(messages)
    n_img = image_token_count(loaded_tiny.cfg, 1, 1)
    expected = ([tok.bos_id] + tok.encode("<|User|>: ") + [tok.image_id] * n_img
                + tok.encode("\nWhat is this?\n\n<|Assistant|>:") + tok.encode("A note.") + [tok.eos_id]
                + tok.encode("<|User|>: And the total?\n\n<|Assistant|>:"))
    assert prepared.input_ids == expected
    assert prepared.prompt == ("<|User|>: <image>\nWhat is this?\n\n<|Assistant|>: A note.<｜end▁of▁sentence｜>"
                               "<|User|>: And the total?\n\n<|Assistant|>:")


def test_system_prompt_opens_the_conversation(loaded_tiny):
    proc = loaded_tiny.processor
    prepared = proc.prepare_prompt("Hi", [], system_prompt="Be brief.")
    tok = proc.tokenizer
    assert prepared.input_ids == [tok.bos_id] + tok.encode("Be brief.") + tok.encode("<|User|>: Hi\n\n<|Assistant|>:")
    assert prepared.prompt.startswith("Be brief.\n\n<|User|>: Hi")


def test_three_images_are_not_tiled(loaded_tiny):
    imgs = [Image.new("RGB", (1000, 400), "white")] * 3
    two = loaded_tiny.processor.prepare_prompt("<image><image>x", imgs[:2])
    three = loaded_tiny.processor.prepare_prompt("<image><image><image>x", imgs)
    assert two.spatial_crop == [[3, 2], [3, 2]] and three.spatial_crop == [[1, 1]] * 3


def test_added_token_order(loaded_tiny):
    tok = loaded_tiny.processor.tokenizer
    names = ["<｜▁pad▁｜>", "<image>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>", "<|User|>",
             "<|Assistant|>"]
    ids = [tok.tok.token_to_id(n) for n in names]
    assert ids == list(range(ids[0], ids[0] + len(names)))
