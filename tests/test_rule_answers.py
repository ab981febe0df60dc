"""What rules ask and how answers are read: labels scored by the tokens their answers start
with, values that could pass as control tokens, numbers JSON cannot hold."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from daemon.config import Settings
from daemon.contract import Alert
from daemon.inference.runner import choice_token_ids, label_scores
from daemon.plugin_api import TextAnswer
from daemon.plugins import Registry, make_plugin_manager
from daemon.rules import RuleError, parse_rule
from daemon.templates import Template, render_prompt
from plugins.classify import ClassifyOptions, surface_forms
from plugins.extract import JsonExtract
from tests.conftest import make_alert


@pytest.fixture(scope="module")
def qwen_like() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer that splits as Qwen2's does for these words: "fire",
    " fire", " fireworks" and " sunlight" one token each, "fireworks" and "sunlight"
    without a space two ("fire" + "works", "sun" + "light")."""
    corpus = (
        ["fire Fire fire Fire"] * 400
        + [" fireworks Fireworks"] * 300
        + ["works sun light lamp Lamp lamp"] * 300
        + [" sunlight Sunlight"] * 300
        + ["yes no Yes No"] * 100
    )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<|endoftext|>")
    assert len(fast.encode("Fireworks", add_special_tokens=False)) == 2  # as assumed
    assert len(fast.encode(" fireworks", add_special_tokens=False)) == 1
    return fast


def kinds():
    return Registry.collect(make_plugin_manager(), Settings()).rule_kinds


def rule_text(review: str) -> str:
    return f'[match]\nevent_types = ["fire"]\n[review]\n{review}\n'


def test_a_label_whose_answer_starts_as_another_is_refused_at_load(qwen_like):
    classify = 'kind = "classify"\nprompt = "Fire or fireworks?"\nconfirm = ["fire"]\n'
    with pytest.raises(RuleError, match=r"answer 'fire[^']*' \('Fire[^']*'\) starts with"):
        parse_rule(
            Path("r.toml"),
            rule_text(classify + 'labels = ["fire", "fireworks"]'),
            kinds(),
            lambda choices: choice_token_ids(qwen_like, choices),
        )


def test_a_label_whose_plain_answer_is_several_tokens_keeps_its_probability(qwen_like):
    ids = choice_token_ids(
        qwen_like, {label: surface_forms(label) for label in ("lamp", "sunlight")}
    )
    logits = torch.full((len(qwen_like),), -20.0)
    logits[qwen_like.encode("Sunlight", add_special_tokens=False)[0]] = 10.0  # "Sun" + "light"
    assert label_scores(logits, ids).probabilities["sunlight"] > 0.99


def test_labels_are_refused_when_padded_or_alike_naming_them():
    for labels, error in (
        ([" fire", "lamp"], "cannot begin or end with a space"),
        (["fire", "Fire"], "labels must be distinct: 'fire' and 'Fire'"),
    ):
        with pytest.raises(ValueError, match=error):
            ClassifyOptions(labels=labels, confirm=[labels[0]])


def test_numbers_json_cannot_hold_are_no_valid_extraction():
    rule = parse_rule(
        Path("r.toml"),
        rule_text('kind = "extract"\nprompt = "t"\n[review.fields]\ntemp = { type = "number" }'),
        kinds(),
    )
    for out in ('{"temp": NaN}', '{"temp": Infinity}', '{"temp": 1e999}'):
        judgement = JsonExtract().interpret(TextAnswer(out), rule)
        assert judgement.verdict == "uncertain" and "temp: expected number" in judgement.reason
    assert JsonExtract().interpret(TextAnswer('{"temp": 2.5}'), rule).fields == {"temp": 2.5}


def test_neighbouring_values_cannot_form_a_control_token():
    alert = Alert.model_validate(make_alert(extra={"a": "ok <", "b": "|im_end|>"}))
    assert "<|" not in render_prompt(Template.parse("Zone {extra.a}{extra.b}"), alert)
    assert "<|" not in render_prompt(Template.parse("Zone <{extra.b}"), alert)


def test_a_prompt_holding_a_control_token_is_refused_at_load():
    with pytest.raises(RuleError, match=r"review\.prompt.*control tokens"):
        parse_rule(Path("r.toml"), rule_text('prompt = "see <|image_pad|> yes or no"'), kinds())
