"""LoRA adapters per rule: loaded on the base model with peft, applied only to their rule's
batches, refused where a backend cannot apply them."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, PromptTuningConfig, get_peft_model
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

from daemon.cli import main
from daemon.config import ModelSettings
from daemon.hookspecs import hookimpl
from daemon.inference.instant import InstantBackend
from daemon.inference.transformers_backend import TransformersBackend
from daemon.plugin_api import Answer, ChoiceQuery, ModelRequest
from daemon.plugins import Registry, make_plugin_manager
from daemon.rules import RuleError, parse_rule
from tests.conftest import FIRE_RULE, jpeg_bytes, make_alert, make_settings, run_daemon

TUNED_RULE = FIRE_RULE.replace("test fire rule", "tuned") + 'adapter = "../adapters/fire-lora"\n'
COLOURS = [(200, 80, 30), (30, 80, 200), (240, 240, 240), (20, 20, 20)]


def save_adapter(tiny_model: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter for the tiny model with weights large enough to move its answers."""
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model)
    config = LoraConfig(
        r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture
def adapter(tmp_path, tiny_model) -> Path:
    return save_adapter(tiny_model, tmp_path / "adapters" / "fire-lora", seed=7)


async def verdicts(settings, rules: dict[str, str]) -> dict[tuple[str, str], float]:
    """P(real) per (alert, rule) for alerts of four colours, reviewed by these rules."""
    for old in settings.rules.dir.glob("*.toml"):
        old.unlink()
    for name, text in rules.items():
        (settings.rules.dir / f"{name}.toml").write_text(text)
    found = {}
    async with run_daemon(settings) as d:
        ids = []
        for i, colour in enumerate(COLOURS):
            alert_id = f"lora-{len(rules)}-{'-'.join(rules)}-{i}"
            image = base64.b64encode(jpeg_bytes(colour=colour)).decode()
            assert (await d.post_alert(make_alert(alert_id, image=image)))[0] == 202
            ids.append((i, alert_id))
        for i, alert_id in ids:
            for verdict in (await d.wait_reviewed(alert_id))["verdicts"]:
                found[(i, verdict["rule"])] = verdict["confidence"]
    return found


async def test_a_rule_with_an_adapter_judges_with_it_and_the_others_without(
    tmp_path, tiny_model, adapter
):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    both = await verdicts(settings, {"base": FIRE_RULE, "tuned": TUNED_RULE})
    alone_base = await verdicts(settings, {"base": FIRE_RULE})
    alone_tuned = await verdicts(settings, {"tuned": TUNED_RULE})
    for i in range(len(COLOURS)):
        # the adapter moves the answer ...
        assert abs(both[(i, "tuned")] - both[(i, "base")]) > 1e-3
        # ... only for its own rule: side by side, each rule answers as it does alone
        assert both[(i, "base")] == pytest.approx(alone_base[(i, "base")], abs=1e-4)
        assert both[(i, "tuned")] == pytest.approx(alone_tuned[(i, "tuned")], abs=1e-4)


async def test_an_adapter_retrained_over_its_old_files_is_used_from_its_next_batch(
    tmp_path, tiny_model, adapter
):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    (settings.rules.dir / "tuned.toml").write_text(TUNED_RULE)
    image = base64.b64encode(jpeg_bytes(colour=COLOURS[0])).decode()

    async def confidence(d, alert_id: str) -> float:
        assert (await d.post_alert(make_alert(alert_id, image=image)))[0] == 202
        [verdict] = (await d.wait_reviewed(alert_id))["verdicts"]
        return verdict["confidence"]

    async with run_daemon(settings) as d:
        before = await confidence(d, "retrain-before")
        shutil.rmtree(adapter)  # the export / train loop of docs/rules.md, saved in place
        save_adapter(tiny_model, adapter, seed=99)
        after = await confidence(d, "retrain-after")
    async with run_daemon(settings) as d:
        fresh = await confidence(d, "retrain-fresh")
    assert abs(fresh - before) > 1e-3  # the two adapters do answer differently
    assert after == pytest.approx(fresh, abs=1e-4)


def test_a_rule_file_with_an_adapter_is_tried_as_a_file_of_its_folder(
    tmp_path, tiny_model, adapter
):
    rule = tmp_path / "rules" / "tuned.toml"  # its adapter: ../adapters/fire-lora
    rule.parent.mkdir()
    rule.write_text(TUNED_RULE)
    image = tmp_path / "frame.jpg"
    image.write_bytes(jpeg_bytes())
    try_it = ["try", str(image), "--rule", str(rule), "--model", str(tiny_model), "--json"]
    result = CliRunner().invoke(main, try_it)  # from another working directory
    assert result.exit_code == 0, result.output


async def test_a_rule_with_an_adapter_is_tried_and_saved_as_a_file_of_the_rules_folder(
    tmp_path, tiny_model, adapter
):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    async with run_daemon(settings) as d:
        body = {"image": base64.b64encode(jpeg_bytes()).decode(), "rule_toml": TUNED_RULE}
        async with d.http.post(f"{d.base_url}/v1/try", json=body) as response:
            assert response.status == 200, await response.text()
        async with d.http.put(f"{d.base_url}/v1/rules/tuned", data=TUNED_RULE.encode()) as response:
            assert response.status == 201, await response.text()


def test_a_missing_adapter_is_a_load_error_naming_the_key(tmp_path):
    kinds = Registry.collect(make_plugin_manager()).rule_kinds
    with pytest.raises(RuleError, match=r"review\.adapter: .* is no LoRA adapter"):
        parse_rule(tmp_path / "rules" / "tuned.toml", TUNED_RULE, kinds)


class FixedModel(InstantBackend):
    """A backend that says nothing of adapters (as docs/hooks.md's example)."""

    def __init__(self, settings: object) -> None:
        super().__init__(settings)  # type: ignore[arg-type]
        self.model_name = "fixed"
        self.requests: list[ModelRequest] = []

    async def run(self, request: ModelRequest) -> Answer:
        self.requests.append(request)
        return await super().run(request)


class FixedModelPlugin:
    @hookimpl
    def register_backends(self, register):
        register("fixed", FixedModel)


async def test_a_backend_that_applies_no_adapters_is_never_asked_to(tmp_path, tiny_model):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    model = settings.model.model_copy(update={"backend": "fixed"})
    settings = settings.model_copy(update={"model": model})
    adapter = tmp_path / "adapters" / "fire-lora"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (settings.rules.dir / "tuned.toml").write_text(TUNED_RULE)
    async with run_daemon(settings, extra_plugins=[FixedModelPlugin()]) as d:
        assert (await d.post_alert(make_alert("lora-1")))[0] == 202
        [verdict] = (await d.wait_reviewed("lora-1"))["verdicts"]
        assert d.daemon.backend.requests == []  # judged by the base model it would have been
    assert verdict["verdict"] == "unreviewed"
    assert "the backend of 'fixed' cannot apply LoRA adapters" in verdict["reason"]


async def test_an_adapter_that_cannot_load_cleanly_leaves_the_base_model_as_it_was(
    tmp_path, tiny_model
):
    adapters = tmp_path / "adapters"
    good = save_adapter(tiny_model, adapters / "good", seed=7)
    missing = Path(shutil.copytree(good, adapters / "missing"))
    (missing / "adapter_model.safetensors").unlink()
    damaged = Path(shutil.copytree(good, adapters / "damaged"))
    weights = damaged / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    model = AutoModelForImageTextToText.from_pretrained(tiny_model)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    get_peft_model(model, config).save_pretrained(adapters / "pissa")  # rewrites base weights
    model = AutoModelForImageTextToText.from_pretrained(tiny_model)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], bias="all")
    get_peft_model(model, config).save_pretrained(adapters / "biased")  # trains the base's biases
    model = AutoModelForImageTextToText.from_pretrained(tiny_model)
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    get_peft_model(model, config).save_pretrained(adapters / "prompt")  # no LoRA at all
    # made for a wider model: each A matrix takes twice this model's inputs
    wider = Path(shutil.copytree(good, adapters / "wider"))
    tensors = load_file(wider / "adapter_model.safetensors")
    tensors = {
        key: torch.cat([value, value], dim=1) if ".lora_A." in key else value
        for key, value in tensors.items()
    }
    save_file(tensors, wider / "adapter_model.safetensors")
    image = Image.new("RGB", (56, 56), (200, 80, 30))
    query = ChoiceQuery("Is there fire? Answer yes or no.", {"yes": ["yes"], "no": ["no"]})
    backend = TransformersBackend(ModelSettings(path=str(tiny_model)))
    await backend.start()
    try:
        before = (await backend.run(ModelRequest(query, [image]))).logits
        for name, reason in (
            ("missing", "cannot load the LoRA adapter"),
            ("damaged", "cannot load the LoRA adapter"),
            ("pissa", "rewrites the base model's weights"),
            ("biased", "trains the base model's biases"),
            ("prompt", "a PROMPT_TUNING adapter"),
            ("wider", "made for another model"),
        ):
            with pytest.raises(ValueError, match=reason):
                await backend.run(ModelRequest(query, [image], str(adapters / name)))
            after = (await backend.run(ModelRequest(query, [image]))).logits
            assert after == before, name  # not a bit changed
        tuned = (await backend.run(ModelRequest(query, [image], str(good)))).logits
        assert tuned != before  # a good adapter still loads, and the base stays the base
        assert (await backend.run(ModelRequest(query, [image]))).logits == before
    finally:
        await backend.close()
