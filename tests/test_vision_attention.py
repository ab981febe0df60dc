"""Grouped vision attention and host-side rope positions give the model's own answers."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from daemon.config import ModelSettings
from daemon.inference import vision_attention
from daemon.inference.runner import ModelRunner
from daemon.inference.synthetic import FAMILIES
from daemon.inference.vision_attention import NAME, grouped_sdpa, stock_vision_attention
from daemon.plugin_api import ChoiceQuery, GenerateQuery, ModelRequest
from plugins.verdict import NO_FORMS, YES_FORMS


def attention_per_sequence(query, key, value, bounds: list[int]) -> torch.Tensor:
    parts = [
        F.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        )
        for start, end in itertools.pairwise(bounds)
    ]
    return torch.cat(parts, dim=2).transpose(1, 2)


@pytest.mark.parametrize(
    "lengths",
    [[12, 12, 12, 12], [12, 5, 12, 7, 5, 12, 3], [9]],
    ids=["one length", "mixed lengths", "one sequence"],
)
def test_grouped_attention_equals_attention_per_sequence(lengths):
    torch.manual_seed(0)
    heads, dim, total = 3, 8, sum(lengths)
    # the vision towers' layout: (1, heads, tokens, head_dim), a transposed view
    query, key, value = (torch.randn(total, heads, dim).transpose(0, 1)[None] for _ in range(3))
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
    grouped, _ = grouped_sdpa(
        None, query, key, value, cu_seq_lens_q=cu_seqlens, max_length_q=max(lengths)
    )
    assert grouped.shape == (1, total, heads, dim)
    expected = attention_per_sequence(query, key, value, bounds)
    torch.testing.assert_close(grouped, expected)
    # the longest length given as a tensor (as older transformers do): same result
    as_tensor, _ = grouped_sdpa(
        None, query, key, value, cu_seq_lens_q=cu_seqlens, max_length_q=torch.tensor(max(lengths))
    )
    torch.testing.assert_close(as_tensor, expected)
    with pytest.raises(ValueError, match="boundaries"):
        grouped_sdpa(None, query, key, value)


def requests(factor: int) -> list[ModelRequest]:
    """Four verdict queries: three snapshots of one size, one of another."""
    sizes = [(factor * 8, factor * 6)] * 3 + [(factor * 5, factor * 9)]
    return [
        ModelRequest(
            ChoiceQuery("Is there fire? Answer yes or no.", {"yes": YES_FORMS, "no": NO_FORMS}),
            [Image.effect_noise(size, 40 + 10 * i).convert("RGB")],
        )
        for i, size in enumerate(sizes)
    ]


class CountingSdpa:
    def __init__(self) -> None:
        self.calls = 0
        self.wrapped = F.scaled_dot_product_attention

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.wrapped(*args, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_towers_answer_the_same_with_fewer_attention_calls(model_dirs, family, monkeypatch):
    runner = ModelRunner.load(ModelSettings(path=str(model_dirs[family])))
    assert runner.model.config.vision_config._attn_implementation == NAME
    assert runner.model.config.text_config._attn_implementation == "sdpa"
    batch = requests(runner.image_factor)
    inputs = runner.collate(batch)
    counting = CountingSdpa()
    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    with torch.inference_mode():
        grouped = runner.model(**inputs, logits_to_keep=1).logits
        grouped_calls, counting.calls = counting.calls, 0
        with stock_vision_attention(runner.model):
            stock = runner.model(**inputs, logits_to_keep=1).logits
    torch.testing.assert_close(grouped, stock, rtol=1e-4, atol=1e-4)
    vision_layers = runner.model.config.vision_config.depth
    # two sizes: two calls per vision layer at most for whole images (more for windows)
    assert counting.calls >= vision_layers * len(batch)
    assert grouped_calls < counting.calls
    if family != "qwen2.5-vl":
        text_layers = runner.model.config.text_config.num_hidden_layers
        assert grouped_calls == vision_layers * 2 + text_layers


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_positions_from_the_collating_thread_equal_the_models_own(model_dirs, family):
    runner = ModelRunner.load(ModelSettings(path=str(model_dirs[family])))
    inputs = runner.collate(requests(runner.image_factor))
    assert inputs["position_ids"].shape == (3, *inputs["input_ids"].shape)
    with torch.inference_mode():
        given = runner.model(**inputs, logits_to_keep=1).logits
        inputs.pop("position_ids")
        own = runner.model(**inputs, logits_to_keep=1).logits
    torch.testing.assert_close(given, own, rtol=1e-5, atol=1e-5)
    extract = ModelRequest(GenerateQuery("Count the people.", 4), [Image.new("RGB", (56, 56))])
    assert "position_ids" not in runner.collate([extract])


def test_other_attention_implementations_are_left_alone(tiny_model):
    runner = ModelRunner.load(ModelSettings(path=str(tiny_model), attn_implementation="eager"))
    assert runner.model.config.vision_config._attn_implementation == "eager"
    assert not vision_attention.use_grouped_attention(runner.model)
