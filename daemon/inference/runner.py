"""The loaded model and processor: inputs for a batch (CPU), one pass over it (model device).

Choice queries (verdicts, classify) cost one forward pass: the next-token logits after the
prompt, reduced to one score per label (log-sum-exp over the first tokens of its surface
forms). Generate queries (extraction) decode greedily. A batch is left-padded, so the last
position of every row is where its answer starts.
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText

from daemon.config import ModelSettings, looks_local
from daemon.inference.compiling import (
    compile_repeated_blocks,
    eager,
    leave_vision_attention_eager,
)
from daemon.inference.processors import load_processor
from daemon.inference.vision_attention import use_grouped_attention
from daemon.plugin_api import (
    Answer,
    ChoiceAnswer,
    ChoiceQuery,
    GenerateQuery,
    ModelLoadError,
    ModelRequest,
    TextAnswer,
)

log = structlog.get_logger(__name__)

SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def pick_device(setting: str) -> torch.device:
    """The torch device of `[model] device`; ModelLoadError when there is no such device."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"[model] device = {setting!r} is not a torch device (auto, cpu, cuda, cuda:1 ...)"
        ) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            f"[model] device = {setting!r}, but CUDA is not available here (no GPU, no driver, "
            'or a torch build without CUDA); use "auto" or "cpu"'
        )
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and device.index is not None and device.index >= count:
        raise ModelLoadError(f"[model] device = {setting!r}, but there are {count} GPUs")
    return device


def check_loading(path: str, loading: Mapping[str, Any]) -> None:
    """Refuse weights that leave parameters of the model's config without values (randomly
    initialised: its verdicts would be noise) or that do not fit their shapes."""
    missing = sorted(loading.get("missing_keys") or ())
    mismatched = [str(item[0]) for item in loading.get("mismatched_keys") or ()]
    if missing or mismatched:
        some = ", ".join((missing + mismatched)[:3])
        raise ModelLoadError(
            f"cannot load model {path!r}: its weights do not match its config.json "
            f"({len(missing)} parameters missing, {len(mismatched)} of another shape, e.g. "
            f"{some})"
        )


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting != "auto":
        return getattr(torch, setting)
    if device.type == "cuda":
        # bfloat16 in hardware from Ampere (compute capability 8) on; torch's own check also
        # says yes where it is only emulated (T4, V100), and looks at the current device
        return torch.bfloat16 if _capability(device) >= (8, 0) else torch.float16
    return torch.float32


def _capability(device: torch.device) -> tuple[int, int]:
    major, minor = torch.cuda.get_device_capability(device)
    return major, minor


#: a fast tokenizer keeps its padding settings between calls: one call without padding (the
#: answers' token ids) while another thread collates a batch would make that batch fail
TOKENIZER_LOCK = threading.Lock()


def choice_token_ids(tokenizer: Any, choices: Mapping[str, Sequence[str]]) -> dict[str, list[int]]:
    """Token ids that start each label's answer.

    Forms that are one token are used as they are, and so is the first token of each form
    without a leading space (the answer's own first word: "Sunlight" starts with "Sun"); a
    label none of whose forms is one token falls back to its forms' first tokens. Ids shared
    by two labels tell nothing and are dropped; a label left with no id is an error, and so
    is one whose answer starts with a token counted for another ("fireworks" = "fire" +
    "works" beside "fire": it would be scored as "fire"). Holds TOKENIZER_LOCK.
    """
    ids: dict[str, set[int]] = {}
    #: per label, the first token of each form without a leading space, and that form
    starts: dict[str, dict[int, str]] = {}
    for label, forms in choices.items():
        with TOKENIZER_LOCK:
            encoded = [tokenizer.encode(form, add_special_tokens=False) for form in forms]
        single = {tokens[0] for tokens in encoded if len(tokens) == 1}
        starts[label] = {
            tokens[0]: form
            for form, tokens in zip(forms, encoded, strict=True)
            if tokens and not form[:1].isspace()
        }
        ids[label] = (single | set(starts[label])) if single else {t[0] for t in encoded if t}
    counts: dict[int, int] = {}
    for token_ids in ids.values():
        for token_id in token_ids:
            counts[token_id] = counts.get(token_id, 0) + 1
    result = {}
    for label, token_ids in ids.items():
        distinct = sorted(t for t in token_ids if counts[t] == 1)
        if not distinct:
            raise ValueError(f"answer {label!r} has no first token distinct from the others")
        result[label] = distinct
    for label, first in starts.items():
        for other, token_ids in ids.items():
            if other != label and (clash := set(first) & token_ids):
                token = min(clash)
                raise ValueError(
                    f"answer {label!r} ({first[token]!r}) starts with the token "
                    f"{tokenizer.decode([token])!r}, which is counted for {other!r}"
                )
    return result


class ChoiceIds:
    """`choice_token_ids` per set of answers, worked out once."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._known: dict[tuple[tuple[str, tuple[str, ...]], ...], dict[str, list[int]]] = {}

    def of(self, choices: Mapping[str, Sequence[str]]) -> dict[str, list[int]]:
        key = tuple((label, tuple(forms)) for label, forms in choices.items())
        if key not in self._known:
            self._known[key] = choice_token_ids(self.tokenizer, choices)
        return self._known[key]

    def check(self, requests: Sequence[ModelRequest]) -> None:
        """ValueError for a request whose answers cannot be scored: raised while collating,
        where a request that fails is tried alone, so that it fails alone."""
        for request in requests:
            if isinstance(request.query, ChoiceQuery):
                self.of(request.query.choices)


def label_scores(logits: torch.Tensor, token_ids: Mapping[str, list[int]]) -> ChoiceAnswer:
    """Per label: log-sum-exp of its tokens' logits; probabilities: softmax over labels."""
    scores = {
        label: float(torch.logsumexp(logits[ids].float(), dim=0))
        for label, ids in token_ids.items()
    }
    top = max(scores.values())
    if not math.isfinite(top) or any(math.isnan(score) for score in scores.values()):
        # (float16 weights overflow in some models): no verdict can be read from them
        raise ValueError(
            "the model's scores are not finite numbers (NaN or infinity): set [model] dtype "
            'to "bfloat16" or "float32"'
        )
    weights = {label: math.exp(score - top) for label, score in scores.items()}
    total = sum(weights.values())
    return ChoiceAnswer(
        probabilities={label: w / total for label, w in weights.items()}, logits=scores
    )


def pick_attention(setting: str, device: torch.device, dtype: torch.dtype) -> str:
    """auto: FlashAttention 2 where it runs (the package installed, a CUDA device of compute
    capability 8 or more, 16-bit weights), else PyTorch's SDPA."""
    if setting != "auto":
        return setting
    if (
        device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and importlib.util.find_spec("flash_attn") is not None
        and _capability(device) >= (8, 0)
    ):
        return "flash_attention_2"
    return "sdpa"


def query_kind(request: ModelRequest) -> str:
    """Requests of one kind share a pass: "choice" (one forward) or "generate", with the
    same LoRA adapter (or none)."""
    kind = "choice" if isinstance(request.query, ChoiceQuery) else "generate"
    return f"{kind}@{request.adapter}" if request.adapter else kind


def rope_index_of(model: Any) -> tuple[Any, tuple[str, ...]] | None:
    """The model's M-RoPE position function and the collated inputs it takes, or None.

    Left to the model, this function runs inside its pass, on the device: a Python loop over
    rows and images that reads values back from the device at most steps. Its signature
    differs between transformers releases, hence the look at its parameters.
    """
    rope_index = getattr(getattr(model, "model", None), "get_rope_index", None)
    if rope_index is None:
        return None
    parameters = inspect.signature(rope_index).parameters
    known = ("input_ids", "mm_token_type_ids", "image_grid_thw", "attention_mask")
    required = {
        name
        for name, parameter in parameters.items()
        if parameter.default is parameter.empty
        and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
    }
    if not required <= set(known) or "image_grid_thw" not in parameters:
        return None
    return rope_index, tuple(name for name in known if name in parameters)


#: an adapter directory's files: (name, size, modification time in ns) of each
AdapterStamp = tuple[tuple[str, int, int], ...]


def adapter_stamp(path: str) -> AdapterStamp:
    """What tells that an adapter's files were written again (a few stat calls)."""
    try:
        with os.scandir(path) as entries:
            files = [entry for entry in entries if entry.is_file()]
            return tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    except OSError:
        return ()  # unreadable now: loading it says why


#: peft initialisations that rewrite the base model's weights as an adapter loads: the other
#: rules (and the bare model) would see a changed model
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def check_adapter(path: str, model: Any = None) -> None:
    """Refuse (ValueError) an adapter before peft touches the model: peft injects its layers
    first and reads its weights after, so a missing or damaged weights file, weights of
    another model's shapes (`model`: the one it is for), or an adapter that changes the base
    model (its initialisation rewriting weights, trained biases) or is no LoRA one would
    change the answers of every other rule."""
    from peft import PeftConfig
    from peft.utils import load_peft_weights

    config = PeftConfig.from_pretrained(path)
    kind = str(getattr(config.peft_type, "value", config.peft_type))
    if kind != "LORA":
        raise ValueError(f"a {kind} adapter: a rule's adapter is a LoRA one")
    if (bias := getattr(config, "bias", "none")) != "none":
        raise ValueError(
            f"bias = {bias!r} trains the base model's biases, which would stay changed for "
            'every other rule: train it with bias = "none"'
        )
    init = getattr(config, "init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise ValueError(
            f"init_lora_weights = {init!r} rewrites the base model's weights as the adapter "
            "loads (every other rule would see a changed model): save it converted to a "
            "plain LoRA adapter"
        )
    weights = load_peft_weights(path, device="cpu")  # there, and whole
    if model is not None:
        _check_shapes(weights, model)


def _check_shapes(weights: dict[str, Any], model: Any) -> None:
    """Each LoRA matrix fits the layer it adapts (A: the layer's inputs, B: its outputs)."""
    modules = dict(model.named_modules())
    for key, tensor in weights.items():
        for suffix, side, attribute in (
            (".lora_A.weight", 1, "in_features"),
            (".lora_B.weight", 0, "out_features"),
        ):
            if not key.endswith(suffix):
                continue
            name = key.removeprefix("base_model.model.").removesuffix(suffix)
            want = getattr(modules.get(name), attribute, None)
            if isinstance(want, int) and tensor.shape[side] != want:
                raise ValueError(
                    f"made for another model: its {name} has {tensor.shape[side]} "
                    f"{attribute.replace('_', ' ')}, this model's {want}"
                )


def context_length(model: Any) -> int | None:
    """The model's context (positions), from its text config."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def image_factor_of(processor: Any) -> int:
    """The side, in pixels, that image sizes must be a multiple of (patch x merge)."""
    image_processor = processor.image_processor
    return int(image_processor.patch_size * image_processor.merge_size)


def collate_batch(processor: Any, requests: Sequence[ModelRequest]) -> Any:
    """The processor's tensors for a batch: chat template, placeholders, image patches."""
    texts = []
    for request in requests:
        content = [{"type": "image"} for _ in request.images]
        content.append({"type": "text", "text": request.query.prompt})
        messages = [{"role": "user", "content": content}]
        texts.append(
            processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        )
    images = [image for request in requests for image in request.images]
    return processor(text=texts, images=images or None, padding=True, return_tensors="pt")


def collate_checked(
    processor: Any, requests: Sequence[ModelRequest], context: int | None, max_new_tokens: int
) -> Any:
    """`collate_batch`, the tokenizer held; ValueError for a request longer than the
    model's `context` leaves (less its answer's tokens), so that alone it fails alone."""
    with TOKENIZER_LOCK:
        inputs = collate_batch(processor, requests)
    if context is not None:
        lengths = inputs["attention_mask"].sum(dim=1).tolist()
        for request, length in zip(requests, lengths, strict=True):
            limit = context
            if isinstance(request.query, GenerateQuery):
                limit -= request.query.max_new_tokens or max_new_tokens
            if length > limit:
                raise ValueError(
                    f"the request is {length} tokens (prompt and images), over the {limit} "
                    f"the model's context of {context} leaves"
                )
    return inputs


def prepare_for_inference(model: Any, compile: bool) -> tuple[str, int]:
    """Evaluation mode, grouped vision attention on SDPA, optional torch.compile (block by
    block, see `compiling`). Returns the vision tower's attention implementation and how
    many blocks were compiled."""
    model.eval()
    grouped = use_grouped_attention(model)
    blocks = 0
    if compile:
        if not grouped:
            leave_vision_attention_eager(model)
        blocks = compile_repeated_blocks(model)
    vision = getattr(model.config, "vision_config", None)
    return str(getattr(vision, "_attn_implementation", None)), blocks


class ModelRunner:
    """The loaded model and processor. `collate` is CPU work (any thread); `forward` runs
    on the model's own thread."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        device: torch.device,
        max_new_tokens: int,
        compiled: bool = False,
    ):
        self.model = model
        #: whether `prepare_for_inference` compiled the model's blocks
        self.compiled = compiled
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = device
        self.max_new_tokens = max_new_tokens
        if hasattr(processor, "pixel_dtype") and hasattr(model, "dtype"):
            processor.pixel_dtype = model.dtype
        self.image_factor = image_factor_of(processor)
        #: the longest sequence the model takes (None: unknown)
        self.context = context_length(model)
        self.choice_ids = ChoiceIds(self.tokenizer)
        #: adapter directory -> its name in the model, and its files' sizes and times then
        self._adapters: dict[str, tuple[str, AdapterStamp]] = {}
        self._adapter_names = itertools.count()
        #: peft's wrapper, once a first adapter is loaded
        self._lora: Any = None
        self._rope_index = rope_index_of(model)

    @classmethod
    def load(cls, settings: ModelSettings) -> ModelRunner:
        device = pick_device(settings.device)
        dtype = pick_dtype(settings.dtype, device)
        attention = pick_attention(settings.attn_implementation, device, dtype)
        if looks_local(settings.path) and not Path(settings.path).is_dir():
            raise ModelLoadError(
                f"cannot load model {settings.path!r}: no such directory. Set [model] path (or "
                "--model) to a directory holding a Hugging Face snapshot, or to a hub id."
            )
        try:
            config = AutoConfig.from_pretrained(settings.path)
            if config.model_type not in SUPPORTED_MODEL_TYPES:
                log.warning(
                    "model type not tested",
                    model_type=config.model_type,
                    supported=SUPPORTED_MODEL_TYPES,
                )
            processor = load_processor(settings.path)
            model, loading = AutoModelForImageTextToText.from_pretrained(
                settings.path, dtype=dtype, attn_implementation=attention, output_loading_info=True
            )
        except ModelLoadError:
            raise
        except (OSError, ValueError, ImportError) as exc:
            reason = str(exc).rstrip(".")
            raise ModelLoadError(
                f"cannot load model {settings.path!r}: {reason}. Set [model] path to a local "
                "directory holding a Hugging Face snapshot, or download the hub id first."
            ) from exc
        except Exception as exc:  # a weights file cut short, weights of another shape ...
            raise ModelLoadError(
                f"cannot load model {settings.path!r}: {type(exc).__name__}: "
                f"{str(exc).strip()[:500]}"
            ) from exc
        check_loading(settings.path, loading)
        try:
            model.to(device)
        except Exception as exc:
            raise ModelLoadError(f"cannot move the model to {device}: {exc}") from exc
        vision_attention, compiled_blocks = prepare_for_inference(model, settings.compile)
        log.info(
            "model loaded",
            model=settings.path,
            model_type=config.model_type,
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
            attention=attention,
            vision_attention=vision_attention,
            compiled_blocks=compiled_blocks if settings.compile else None,
            processor=type(processor).__name__,
        )
        return cls(model, processor, device, settings.max_new_tokens, settings.compile)

    def collate(self, requests: Sequence[ModelRequest]) -> Any:
        """The processor's tensors for a batch (see `collate_checked`), and the positions
        of a choice batch."""
        self.choice_ids.check(requests)
        inputs = collate_checked(self.processor, requests, self.context, self.max_new_tokens)
        return self.add_positions(requests, inputs)

    def add_positions(self, requests: Sequence[ModelRequest], inputs: Any) -> Any:
        """The M-RoPE positions of a choice batch with images, worked out on the CPU (left to
        the model, they cost a device read-back per step of its loop). `generate` keeps its
        own: it carries them from step to step."""
        if not self._rope_index or not isinstance(requests[0].query, ChoiceQuery):
            return inputs
        rope_index, names = self._rope_index
        if "position_ids" not in inputs and all(name in inputs for name in names):
            inputs["position_ids"], _ = rope_index(**{name: inputs[name] for name in names})
        return inputs

    def forward(self, requests: Sequence[ModelRequest], inputs: Any) -> list[Answer | Exception]:
        """One pass over a collated batch of one kind: an answer per request, or the error of
        a request whose answer alone could not be read."""
        kinds = {query_kind(request) for request in requests}
        if len(kinds) != 1:
            raise ValueError("a batch must hold requests of one kind and one adapter")
        self._use_adapter(requests[0].adapter)
        inputs = inputs.to(self.device)
        if isinstance(requests[0].query, ChoiceQuery):
            return list(self._score_choices(requests, inputs))
        return list(self._generate(requests, inputs))

    def _use_adapter(self, path: str | None) -> None:
        """Apply a rule's LoRA adapter (loaded on first use, and again once its files
        change: retrained weights saved over the old) or the bare base model.

        peft injects the adapters' layers into the model in place, so `self.model` runs with
        whichever is active; switching costs no copy of the weights."""
        if path is None:
            if self._lora is not None:
                self._lora.base_model.disable_adapter_layers()
            return
        stamp = adapter_stamp(path)
        loaded = self._adapters.get(path)
        if loaded is not None and loaded[1] == stamp:
            name = loaded[0]
        else:
            name = f"adapter_{next(self._adapter_names)}"
            self._load_adapter(path, name)
            self._adapters[path] = (name, stamp)
            if loaded is not None:  # the old weights: no longer used by any rule
                self._lora.base_model.set_adapter(name)
                self._lora.delete_adapter(loaded[0])
            log.info("lora adapter loaded", adapter=path, name=name, replaced=loaded is not None)
        assert self._lora is not None
        self._lora.base_model.set_adapter(name)
        self._lora.base_model.enable_adapter_layers()

    def _load_adapter(self, path: str, name: str) -> None:
        try:
            from peft import PeftModel

            check_adapter(path, self.model)
            if self._lora is None:
                self._lora = PeftModel.from_pretrained(self.model, path, adapter_name=name)
                self._lora.eval()
            else:
                self._lora.load_adapter(path, adapter_name=name)
        except Exception as exc:  # safetensors' own error for a damaged file among them
            raise ValueError(f"cannot load the LoRA adapter {path}: {exc}") from exc

    def run_batch(self, requests: Sequence[ModelRequest]) -> list[Answer | Exception]:
        return self.forward(requests, self.collate(requests))

    def run(self, request: ModelRequest) -> Answer:
        answer = self.run_batch([request])[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def warm_up(self) -> None:
        """One small pass before the daemon reports ready: lazy initialisation, kernel
        selection and compilation happen here, not on the first alert. A compiled model gets
        three more passes: one snapshot of another size, two snapshots, and two of different
        sizes and prompts (padded). Its blocks are compiled for any size, but apart for a
        batch of one and of several, without padding and with, and where a size happens to
        equal another (a vision tower of 64 patches, heads 64 wide); after these four
        passes no batch compiles anything, and no alert waits for a compile."""
        side = self.image_factor * 5  # 100 patches: no width of the models' heads
        query = ChoiceQuery("Is this grey? Answer yes or no.", {"yes": ["yes"], "no": ["no"]})
        square = ModelRequest(query, [Image.new("RGB", (side, side), (128, 128, 128))])
        started = time.perf_counter()
        self.run(square)
        if self.compiled:
            wide = Image.new("RGB", (side + 2 * self.image_factor, side), (128, 128, 128))
            self.run(ModelRequest(query, [wide]))
            longer = ChoiceQuery("Is this image grey? Answer yes or no.", query.choices)
            for batch in ([square, square], [square, ModelRequest(longer, [wide])]):
                for answer in self.run_batch(batch):
                    if isinstance(answer, Exception):
                        raise answer
        log.info("model warmed up", seconds=round(time.perf_counter() - started, 3))

    @torch.inference_mode()
    def _score_choices(
        self, requests: Sequence[ModelRequest], inputs: Any
    ) -> list[ChoiceAnswer | Exception]:
        # one pass, no cache kept: nothing is generated after it
        logits = self.model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1, :]
        answers: list[ChoiceAnswer | Exception] = []
        for row, request in zip(logits, requests, strict=True):
            assert isinstance(request.query, ChoiceQuery)
            try:
                answers.append(label_scores(row, self.choice_ids.of(request.query.choices)))
            except ValueError as exc:  # this row's scores only: the others stand
                answers.append(exc)
        return answers

    @torch.inference_mode()
    def _generate(self, requests: Sequence[ModelRequest], inputs: Any) -> list[TextAnswer]:
        # each row's own limit (a rule's, else the configured one): the batch generates to
        # the largest, and each answer is cut to its own, as greedy decoding alone would give
        limits = [
            (isinstance(r.query, GenerateQuery) and r.query.max_new_tokens) or self.max_new_tokens
            for r in requests
        ]
        with eager():
            output = self.model.generate(
                **inputs,
                max_new_tokens=max(limits),
                # greedy, whatever the snapshot's generation_config says (Qwen2-VL's Instruct
                # snapshots ask for a repetition penalty, which bends JSON's repeated braces
                # and quotes)
                do_sample=False,
                repetition_penalty=1.0,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(
            [row[:limit] for row, limit in zip(new_tokens, limits, strict=True)],
            skip_special_tokens=True,
        )
        return [TextAnswer(text.strip()) for text in texts]
