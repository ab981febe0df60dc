"""Backend `openai`: an OpenAI-compatible chat-completions server serving a vision model.

For when one local GPU is not enough: vLLM, SGLang, LMDeploy or Ollama on other machines.
Images go as JPEG data URLs, already scaled to the token budget.

- Choice queries ask for one token with `logprobs` and `top_logprobs`. A label's score is
  the log-sum-exp of the listed tokens that name it (see `label_of_token`). A label none of
  whose forms is listed can only be less likely than the least likely listed token, each of
  its forms: it gets that logprob plus the log of its number of forms, an upper bound, which
  errs towards `uncertain`. Labels one of whose forms begins another label's are refused
  when the rule loads (`check_choices`): the server's tokenizer is unknown here, and the
  longer one's answer could start with the shorter one's token.
- Servers that return no logprobs get a fallback: the answer's first token picks a label by
  the same rule, with probability 1 (so such verdicts are never calibrated;
  `confirm_at`/`reject_below` still apply).
- Generate queries send the rule's JSON schema as `response_format` (`json_schema`).
- Timeouts, connection errors, HTTP 429 and 5xx are retried with exponential backoff (each
  wait at most 30 s; a Retry-After in seconds is honoured up to that); other answers fail
  at once. At most `concurrency` requests are in flight, each on a connection of its own.
- Answers are checked before use: at most 4 MiB, JSON, the expected shape, logprobs that
  are finite log-probabilities. Anything else fails the request with a reason naming it
  (the rule's `on_error` follows), never a confident verdict made of garbage.

Response shapes follow vLLM's `ChatCompletionResponse`
(vllm/entrypoints/openai/chat_completion/protocol.py), which follows OpenAI's API reference
for chat completions: `choices[0].message.content` and
`choices[0].logprobs.content[0].top_logprobs[] = {token, logprob, bytes}`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
import structlog
from PIL.Image import Image

from daemon.config import ModelSettings
from daemon.credentials import CredentialError, read_secret
from daemon.hookspecs import hookimpl
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

JPEG_QUALITY = 90
#: the largest answer read (a chat completion of one token or a rule's fields is a few KB;
#: a server that sends more, or an endless body, is not read into memory)
MAX_ANSWER_BYTES = 4 * 2**20
#: of an error answer, the start is kept for the reason
ERROR_DETAIL_BYTES = 200
#: the longest wait between two attempts (also for a 429's Retry-After)
MAX_BACKOFF_S = 30.0
#: a logprob above this is no log-probability (rounding may put a sure token a hair over 0)
LOGPROB_MAX = 1e-3


class RemoteError(RuntimeError):
    """The server could not answer (after retries), or answered something unusable."""


class _Retryable(RemoteError):
    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        #: the server's Retry-After, in seconds, when it sent one
        self.retry_after_s = retry_after_s


def data_url(image: Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_messages(request: ModelRequest) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": data_url(image)}} for image in request.images
    ]
    content.append({"type": "text", "text": request.query.prompt})
    return [{"role": "user", "content": content}]


#: a token shorter than this that is no whole form names no label by beginning one ("I",
#: "A" and "The" begin too many words: "intruder", "animal", "theft")
PREFIX_MIN_CHARS = 3


def label_of_token(
    token: str, choices: Mapping[str, Sequence[str]], *, fold_case: bool = False
) -> str | None:
    """The label a first answer token names: the one with a form equal to it, else the one
    whose forms it begins ("fork" for "forklift", as the transformers backend scores each
    form's first token) if it is at least PREFIX_MIN_CHARS long; None where no label or
    several are named."""

    def same(text: str) -> str:
        return text.lower() if fold_case else text

    token = same(token)
    if not token.strip():
        return None
    named = [label for label, forms in choices.items() if token in map(same, forms)]
    if not named and len(token.strip()) >= PREFIX_MIN_CHARS:
        named = [
            label
            for label, forms in choices.items()
            if any(same(form).startswith(token) for form in forms)
        ]
    return named[0] if len(named) == 1 else None


#: the probability left for unlisted tokens, at least (the listed ones may round past 1)
UNLISTED_MIN = 1e-9


def choice_from_logprobs(
    top: Sequence[Mapping[str, Any]], choices: Mapping[str, Sequence[str]]
) -> ChoiceAnswer | None:
    """Label probabilities from the first answer token's top logprobs (None: no label
    appears among them); each listed token counts for the label it names (`label_of_token`).
    RemoteError for entries that are no (token, log-probability)."""
    listed_tokens = _token_logprobs(top)
    if not listed_tokens:
        return None
    floor = min(logprob for _, logprob in listed_tokens)
    # nor more likely than what the listed tokens leave: with one listed (top_logprobs = 1)
    # the least listed is the top one, and a label left out would outweigh it
    rest = 1.0 - math.fsum(math.exp(logprob) for _, logprob in listed_tokens)
    left = math.log(max(rest, UNLISTED_MIN))
    per_label: dict[str, list[float]] = {label: [] for label in choices}
    for token, logprob in listed_tokens:
        label = label_of_token(token, choices)
        if label is not None:
            per_label[label].append(logprob)
    if not any(per_label.values()):
        return None
    scores = {
        # unlisted: each of its forms' first tokens is less likely than the least listed one
        label: _logsumexp(got) if got else min(floor + math.log(len(set(choices[label]))), left)
        for label, got in per_label.items()
    }
    top_score = max(scores.values())
    weights = {label: math.exp(score - top_score) for label, score in scores.items()}
    total = sum(weights.values())
    return ChoiceAnswer({label: w / total for label, w in weights.items()}, scores)


def _token_logprobs(top: Any) -> list[tuple[str, float]]:
    """`top_logprobs` entries as (token, logprob), each checked."""
    if not isinstance(top, list):
        raise RemoteError(f"top_logprobs is {type(top).__name__}, not a list")
    checked = []
    for i, entry in enumerate(top):
        token = entry.get("token") if isinstance(entry, dict) else None
        logprob = entry.get("logprob") if isinstance(entry, dict) else None
        if not isinstance(token, str) or isinstance(logprob, bool):
            raise RemoteError(f"top_logprobs[{i}] is no {{token, logprob}} entry: {entry!r:.80}")
        try:
            value = float(logprob)  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError):
            raise RemoteError(
                f"top_logprobs[{i}].logprob is not a number: {logprob!r:.40}"
            ) from None
        if not -math.inf < value <= LOGPROB_MAX:  # NaN, +inf, -inf and positive values too
            raise RemoteError(f"top_logprobs[{i}].logprob {value} is no log-probability")
        checked.append((token, value))
    return checked


def choice_from_text(text: str, choices: Mapping[str, Sequence[str]]) -> ChoiceAnswer | None:
    """Fallback without logprobs: the answer's first word (one token: it may be the start
    of a longer label, "fork" for "forklift") names the label, as a listed token would."""
    words = text.strip().split()
    if not words:
        return None
    first = words[0].strip(".,:;!\"'")
    stripped = {label: [form.strip() for form in forms] for label, forms in choices.items()}
    label = label_of_token(first, stripped, fold_case=True)
    if label is None:
        return None
    probabilities = {other: float(other == label) for other in choices}
    logits = {other: 0.0 if other == label else -math.inf for other in choices}
    return ChoiceAnswer(probabilities, logits)


def check_remote_choices(choices: Mapping[str, Sequence[str]]) -> None:
    """ValueError for labels whose first tokens a remote server's could not tell apart."""
    clash = clashing_labels(choices)
    if clash is not None:
        raise ValueError(
            f"answer {clash[1]!r} begins with answer {clash[0]!r}: with a remote server "
            "its first token could be the other's; rename one of them"
        )


def clashing_labels(choices: Mapping[str, Sequence[str]]) -> tuple[str, str] | None:
    """Two labels one of whose forms begins a form of the other ("fire", "fireworks"), case
    aside; None when there are none."""
    for label, forms in choices.items():
        for other, other_forms in choices.items():
            if other == label:
                continue
            for form in forms:
                short = form.strip().lower()
                if short and any(f.strip().lower().startswith(short) for f in other_forms):
                    return label, other
    return None


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


class OpenAIBackend:
    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings
        self.remote = settings.remote
        # the verdicts' `model`: [model] name when set, else the model the server serves
        self.model_name = settings.name or self.remote.model or settings.display_name
        self.image_factor = self.remote.image_factor
        self._served_model = self.remote.model or settings.path
        self._limit = asyncio.Semaphore(self.remote.concurrency)
        self._session: aiohttp.ClientSession | None = None
        #: sent with each request (a key re-read on SIGHUP applies to the next one)
        self._headers: dict[str, str] = {}
        #: requests that failed (after their retries), in all and in a row; the last reason
        self._failures = 0
        self._failing = 0
        self._last_error: str | None = None

    async def start(self) -> None:
        key_file = self.remote.api_key_file
        if key_file is not None:
            try:
                self._headers["Authorization"] = f"Bearer {self._read_key()}"
            except CredentialError as exc:
                raise ModelLoadError(str(exc)) from exc
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.remote.timeout_s),
            # as many connections as requests in flight: none waits for a connection
            # (the wait would count against its timeout)
            connector=aiohttp.TCPConnector(limit=self.remote.concurrency),
        )
        log.info(
            "remote backend",
            url=self.remote.url,
            model=self._served_model,
            authenticated=key_file is not None,
        )

    def _read_key(self) -> str:
        """The API key from its file; CredentialError naming the file when unusable."""
        key_file = self.remote.api_key_file
        assert key_file is not None
        key = read_secret(key_file, "[model.remote] api_key_file").strip()
        if not key.isprintable() or not key.isascii() or " " in key:
            raise CredentialError(
                f"[model.remote] api_key_file {key_file}: the key must be one line of "
                "printable ASCII without spaces"
            )
        return key

    def reread_credentials(self) -> None:
        """SIGHUP: read the API key file again; a file that cannot be used keeps the key
        in force."""
        if self.remote.api_key_file is None:
            return
        try:
            self._headers["Authorization"] = f"Bearer {self._read_key()}"
        except CredentialError as exc:
            log.error("api key not re-read; the key in force stays", error=str(exc))
            return
        log.info("api key re-read")

    def health(self) -> dict[str, Any]:
        """What /healthz and /metrics show of the server. Failures make the daemon no less
        fit (a restart would not mend the server): the alerts end `unreviewed`, named."""
        return {
            "url": self.remote.url,
            "failures": self._failures,
            "failing_in_a_row": self._failing,
            "last_error": self._last_error,
        }

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def check_choices(self, choices: Mapping[str, Sequence[str]]) -> None:
        """Refuse labels the first token could not tell apart (at rule load)."""
        check_remote_choices(choices)

    async def run(self, request: ModelRequest) -> Answer:
        """The answer, or RemoteError (counted in `health`, as a failed request is)."""
        try:
            answer = await self._answer(request)
        except RemoteError as exc:
            self._failures += 1
            self._failing += 1
            self._last_error = str(exc)
            raise
        self._failing = 0
        return answer

    async def _answer(self, request: ModelRequest) -> Answer:
        query = request.query
        body: dict[str, Any] = {
            "model": self._served_model,
            "messages": await asyncio.to_thread(chat_messages, request),
            "temperature": 0,
        }
        if isinstance(query, ChoiceQuery):
            body |= {"max_tokens": 1, "logprobs": True, "top_logprobs": self.remote.top_logprobs}
            return self._choice(await self._post_with_retries(body), query)
        assert isinstance(query, GenerateQuery)
        body["max_tokens"] = query.max_new_tokens or self.settings.max_new_tokens
        if query.json_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "fields", "schema": dict(query.json_schema)},
            }
        return TextAnswer(_message_text(await self._post_with_retries(body)).strip())

    def _choice(self, response: Mapping[str, Any], query: ChoiceQuery) -> ChoiceAnswer:
        choice = _first_choice(response)
        logprobs = _field(choice, "logprobs", dict, "choices[0]")
        tokens = _field(logprobs, "content", list, "logprobs")
        if tokens:
            if not isinstance(tokens[0], dict):
                raise RemoteError(f"logprobs.content[0] is {type(tokens[0]).__name__}, not dict")
            top = _field(tokens[0], "top_logprobs", list, "logprobs.content[0]")
            if not top:  # a server that gives the chosen token's logprob alone
                top = [tokens[0]]
            # no more than were asked for
            answer = choice_from_logprobs(top[: self.remote.top_logprobs], query.choices)
            if answer is not None:
                return answer
            listed = ", ".join(repr(e.get("token")) for e in top[:8] if isinstance(e, dict))
            raise RemoteError(
                f"none of {', '.join(query.choices)} among the answer's likeliest first "
                f"tokens ({listed})"
            )
        # no logprobs from this server: read the answer instead
        text = _message_text(response)
        answer = choice_from_text(text, query.choices)
        if answer is None:
            raise RemoteError(f"the answer {text[:40]!r} names none of {', '.join(query.choices)}")
        return answer

    async def _post_with_retries(self, body: dict[str, Any]) -> dict[str, Any]:
        if self._session is None:
            raise RuntimeError("the backend is not started")
        url = self.remote.url.rstrip("/") + "/chat/completions"
        attempts = self.remote.max_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                async with self._limit:
                    return await self._post_once(url, body)
            except _Retryable as exc:
                if attempt == attempts:
                    raise RemoteError(f"{exc} (after {attempts} attempts)") from exc
                delay = min(MAX_BACKOFF_S, self.remote.retry_backoff_s * 2 ** (attempt - 1))
                delay = random.uniform(delay / 2, delay)
                if exc.retry_after_s is not None:
                    delay = min(MAX_BACKOFF_S, max(delay, exc.retry_after_s))
                log.warning(
                    "remote model retry",
                    attempt=attempt,
                    error=str(exc),
                    retry_in_s=round(delay, 2),
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _post_once(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        assert self._session is not None
        try:
            # never redirected: the snapshots go to the configured server or nowhere
            async with self._session.post(
                url, json=body, headers=self._headers, allow_redirects=False
            ) as response:
                if 300 <= response.status < 400:
                    where = response.headers.get("Location", "nowhere")
                    raise RemoteError(
                        f"HTTP {response.status} from {url}: redirects to {where[:200]}; "
                        "set [model.remote] url to the server that answers"
                    )
                if response.status == 429 or response.status >= 500:
                    raise _Retryable(
                        f"HTTP {response.status} from {url}", _retry_after(response.headers)
                    )
                if response.status != 200:
                    start = await response.content.read(ERROR_DETAIL_BYTES)
                    detail = start.decode("utf-8", errors="replace")
                    raise RemoteError(f"HTTP {response.status} from {url}: {detail}")
                text = (await _read_capped(response, url)).decode("utf-8", errors="replace")
        except TimeoutError as exc:
            raise _Retryable(f"no answer from {url} within {self.remote.timeout_s} s") from exc
        except aiohttp.ClientError as exc:
            raise _Retryable(f"{url}: {exc}") from exc
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            kind = response.headers.get("Content-Type", "no Content-Type")
            raise RemoteError(f"{url} answered {kind} that is no JSON: {text[:80]!r}") from None
        if not isinstance(data, dict):
            raise RemoteError(f"{url} answered {type(data).__name__}, not a JSON object")
        _raise_for_error_body(data, url)
        return data


def _raise_for_error_body(data: Mapping[str, Any], url: str) -> None:
    """An error answered with status 200 (some proxies and gateways do): its own message,
    retried where its code says it is passing (429, 5xx)."""
    if "choices" in data:
        return
    error = data.get("error")
    if error is None and data.get("object") == "error":  # vLLM's shape
        error = data
    if error is None:
        return
    message = error.get("message") if isinstance(error, dict) else error
    code = error.get("code") if isinstance(error, dict) else None
    text = f"{url} answered an error: {str(message)[:200]}"
    if isinstance(code, int) and not isinstance(code, bool) and (code == 429 or code >= 500):
        raise _Retryable(text, None)
    raise RemoteError(text)


async def _read_capped(response: aiohttp.ClientResponse, url: str) -> bytes:
    """The answer's body (decompressed), refused past MAX_ANSWER_BYTES."""
    refusal = f"{url} answered more than {MAX_ANSWER_BYTES} bytes"
    if (response.content_length or 0) > MAX_ANSWER_BYTES:
        raise RemoteError(refusal)
    body = bytearray()
    async for chunk in response.content.iter_chunked(2**16):
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            raise RemoteError(refusal)
    return bytes(body)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """A Retry-After of seconds (an HTTP date, or nonsense, is left to the backoff)."""
    try:
        seconds = float(headers.get("Retry-After", ""))
    except ValueError:
        return None
    return seconds if 0 <= seconds < math.inf else None


def _field(parent: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    """`parent[key]` when it is of `kind`; an empty one when absent or null."""
    value = parent.get(key)
    if value is None:
        return kind()
    if not isinstance(value, kind):
        raise RemoteError(f"{where}.{key} is {type(value).__name__}, not {kind.__name__}")
    return value


def _first_choice(response: Mapping[str, Any]) -> Mapping[str, Any]:
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise RemoteError("the server's answer has no choices")
    return choices[0]


def _message_text(response: Mapping[str, Any]) -> str:
    """The answer's text; RemoteError where there is none (a refusal, a cut-off answer)."""
    choice = _first_choice(response)
    message = choice.get("message")
    if not isinstance(message, dict):
        raise RemoteError("choices[0] has no message")
    content = message.get("content")
    if not isinstance(content, str):
        why = message.get("refusal") or f"finish_reason {choice.get('finish_reason')!r:.40}"
        raise RemoteError(f"the answer has no text content: {str(why)[:200]}")
    return content


@hookimpl
def register_backends(register):
    register("openai", OpenAIBackend)
