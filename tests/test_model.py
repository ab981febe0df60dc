"""The model path with real transformers code on tiny Qwen2-VL and Qwen2.5-VL models."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from daemon.config import ModelSettings
from daemon.inference.patches import can_patch_directly, patch_images
from daemon.inference.processors import ImageOnlyProcessor, load_processor
from daemon.inference.runner import ModelRunner
from daemon.plugin_api import ModelLoadError
from plugins.verdict import NO_FORMS, YES_FORMS
from tests.conftest import EXTRACT_RULE, FIRE_RULE, make_alert, make_settings, run_daemon
from tests.direct import label_probabilities, next_token_logits, png_b64

FAMILIES = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"]


def direct_p_yes(model_dir, prompt: str, image: Image.Image) -> float:
    logits, tokenizer = next_token_logits(model_dir, prompt, image)
    return label_probabilities(logits, tokenizer, {"yes": YES_FORMS, "no": NO_FORMS})["yes"]


@pytest.mark.parametrize("family", FAMILIES)
async def test_verdict_confidence_is_the_softmax_of_the_models_yes_no_logits(
    tmp_path, model_dirs, family
):
    model_dir = model_dirs[family]
    settings = make_settings(tmp_path, broker=None, model=model_dir)
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    # 448x224: a multiple of 28 and 32 within the token budget: the daemon does not rescale it
    image_b64, image = png_b64((448, 224))
    async with run_daemon(settings) as d:
        status, _ = await d.post_alert(make_alert("logits-1", image=image_b64))
        assert status == 202
        record = await d.wait_reviewed("logits-1")
    confidence = record["verdicts"][0]["confidence"]
    expected = direct_p_yes(model_dir, "Is there a real open flame? Answer yes or no.", image)
    assert confidence == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
async def test_extract_rule_reports_invalid_model_output(tmp_path, model_dirs, family):
    """A random model does not write the JSON asked for: the verdict says what is wrong."""
    settings = make_settings(tmp_path, broker=None, model=model_dirs[family])
    (settings.rules.dir / "people.toml").write_text(EXTRACT_RULE)
    async with run_daemon(settings) as d:
        await d.post_alert(make_alert("extract-1", event_type="people_gathering"))
        record = await d.wait_reviewed("extract-1")
    [verdict] = record["verdicts"]
    assert verdict["rule"] == "people"
    assert verdict["verdict"] == "uncertain"
    assert verdict["reason"].startswith("invalid model output")
    assert verdict["fields"] == {}


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_scores_equal_single_scores_and_generation_runs(model_dirs, family):
    from daemon.plugin_api import ChoiceQuery, GenerateQuery, ModelRequest, TextAnswer

    runner = ModelRunner.load(ModelSettings(path=str(model_dirs[family]), max_new_tokens=8))
    assert isinstance(runner.processor, ImageOnlyProcessor)
    images = [Image.new("RGB", (224, 224), (10, 200, 30)), Image.new("RGB", (336, 168), (90, 9, 9))]
    requests = [
        ModelRequest(ChoiceQuery("yes or no?", {"yes": YES_FORMS, "no": NO_FORMS}), [images[0]]),
        ModelRequest(
            ChoiceQuery(
                "Is there a real open flame here? yes or no?", {"yes": YES_FORMS, "no": NO_FORMS}
            ),
            [images[1]],
        ),
    ]
    batched = runner.run_batch(requests)
    for request, together in zip(requests, batched, strict=True):
        alone = runner.run(request)
        assert sum(alone.probabilities.values()) == pytest.approx(1.0)
        assert together.probabilities["yes"] == pytest.approx(alone.probabilities["yes"], abs=1e-4)
    answer = runner.run(ModelRequest(GenerateQuery("Describe.", 5), images))
    assert isinstance(answer, TextAnswer)


def test_missing_model_is_a_clear_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot load model"):
        ModelRunner.load(ModelSettings(path=str(tmp_path / "no-such-model")))


def test_a_text_only_tokenizer_template_gives_way_to_the_processors(tmp_path, tiny_model):
    snapshot = tmp_path / "snapshot"
    shutil.copytree(tiny_model, snapshot)
    config = json.loads((snapshot / "tokenizer_config.json").read_text())
    text_only = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    config["chat_template"] = text_only
    (snapshot / "tokenizer_config.json").write_text(json.dumps(config))
    processor = load_processor(str(snapshot))
    own = json.loads((snapshot / "chat_template.json").read_text())["chat_template"]
    assert processor.chat_template == own != text_only


def test_weights_that_do_not_fit_the_config_are_a_clear_load_error(tmp_path, tiny_model):
    # a weights file cut short
    cut = tmp_path / "cut"
    shutil.copytree(tiny_model, cut)
    weights = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ModelLoadError, match=r"cannot load model .*SafetensorError"):
        ModelRunner.load(ModelSettings(path=str(cut)))
    # a config with one layer more than the weights hold: the layer would be random noise
    deeper = tmp_path / "deeper"
    shutil.copytree(tiny_model, deeper)
    config = json.loads((deeper / "config.json").read_text())
    text = config["text_config"]
    text["num_hidden_layers"] += 1
    text["layer_types"].append(text["layer_types"][-1])
    (deeper / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"weights do not match its config.json \(\d+ param"):
        ModelRunner.load(ModelSettings(path=str(deeper)))


@pytest.mark.parametrize(
    ("device", "message"),
    [("gpu", "is not a torch device"), ("cuda:999", "CUDA is not available|there are")],
)
def test_a_device_that_is_not_there_is_a_clear_load_error(tiny_model, device, message):
    with pytest.raises(ModelLoadError, match=message):
        ModelRunner.load(ModelSettings(path=str(tiny_model), device=device))


def test_processor_expands_placeholders_to_visual_tokens(tiny_model):
    processor = load_processor(str(tiny_model))
    assert isinstance(processor, ImageOnlyProcessor)
    batch = processor(
        text=["<|vision_start|><|image_pad|><|vision_end|>hi"], images=[Image.new("RGB", (56, 56))]
    )
    image_id = processor.image_token_id
    # 56x56 pixels = 4x4 patches of 14 px, merged 2x2: 4 visual tokens
    assert int((batch["input_ids"] == image_id).sum()) == 4
    assert batch["mm_token_type_ids"].sum() == 4
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]]
    with pytest.raises(ValueError, match="more images"):
        processor(text=["no placeholder"], images=[Image.new("RGB", (56, 56))])


@pytest.mark.parametrize("family", FAMILIES)
def test_direct_patches_equal_the_image_processor(model_dirs, family):
    processor = load_processor(str(model_dirs[family]))
    factor = processor.image_processor.patch_size * processor.image_processor.merge_size
    rng = np.random.default_rng(3)
    images = [
        Image.fromarray(rng.integers(0, 256, (factor * h, factor * w, 3), dtype=np.uint8))
        for h, w in ((3, 5), (4, 2))
    ]
    assert can_patch_directly(images, processor.image_processor)
    direct = patch_images(images, processor.image_processor)
    reference = processor.image_processor(images=images, return_tensors="pt")
    assert direct["image_grid_thw"].tolist() == reference["image_grid_thw"].tolist()
    assert direct["pixel_values"].shape == reference["pixel_values"].shape
    torch.testing.assert_close(
        direct["pixel_values"], reference["pixel_values"].float(), atol=1e-5, rtol=1e-5
    )
    # a size the processor would change goes through the processor itself
    assert not can_patch_directly(
        [Image.new("RGB", (factor + 1, factor))], processor.image_processor
    )
