"""A small OpenAI-compatible chat-completions server for the tests.

It answers `POST /v1/chat/completions` with the exact JSON shape vLLM's OpenAI server
returns: `ChatCompletionResponse` in vllm/entrypoints/openai/chat_completion/protocol.py
(id, object, created, model, choices[{index, message{role, content, refusal, annotations,
audio, function_call, reasoning}, logprobs{content[{token, logprob, bytes, top_logprobs
[{token, logprob, bytes}]}]}, finish_reason, stop_reason, token_ids}], service_tier,
system_fingerprint, usage{prompt_tokens, total_tokens, completion_tokens,
prompt_tokens_details}, prompt_logprobs, prompt_token_ids, kv_transfer_params). What it
answers is scripted by the test: the top logprobs of the first token, or a text.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.conftest import serve


@dataclass
class Script:
    """What the server does; tests change it between requests."""

    #: first token's top logprobs, token -> logprob (None: a server that returns none)
    top_logprobs: dict[str, float] | None = field(
        default_factory=lambda: {"Yes": -0.25, "No": -1.7, "yes": -3.2, " no": -4.0, "The": -5}
    )
    #: the message content
    text: str = "Yes"
    #: answer HTTP 503 to this many requests first
    fail_first: int = 0
    #: sleep this long before answering
    delay_s: float = 0.0
    #: the API key it requires (None: any)
    api_key: str | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)


def logprob_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def vllm_response(body: dict[str, Any], script: Script) -> dict[str, Any]:
    chosen = script.text[:4] if body.get("max_tokens") == 1 else script.text
    logprobs = None
    if body.get("logprobs") and script.top_logprobs is not None:
        top = sorted(script.top_logprobs.items(), key=lambda item: -item[1])
        top = top[: int(body.get("top_logprobs") or 0)]
        first = top[0] if top else (chosen, -0.1)
        logprobs = {
            "content": [{**logprob_entry(*first), "top_logprobs": [logprob_entry(*t) for t in top]}]
        }
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model"),
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": chosen,
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "reasoning": None,
                },
                "logprobs": logprobs,
                "finish_reason": "length" if body.get("max_tokens") == 1 else "stop",
                "stop_reason": None,
                "token_ids": None,
            }
        ],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": {
            "prompt_tokens": 321,
            "total_tokens": 322,
            "completion_tokens": 1,
            "prompt_tokens_details": None,
        },
        "prompt_logprobs": None,
        "prompt_token_ids": None,
        "kv_transfer_params": None,
    }


@contextlib.asynccontextmanager
async def openai_server(script: Script) -> AsyncIterator[str]:
    """Serve `script` on a free port; yields the base URL (…/v1)."""

    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        script.requests.append(body)
        script.headers.append(dict(request.headers))
        expected = f"Bearer {script.api_key}"
        if script.api_key is not None and request.headers.get("Authorization") != expected:
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        if script.fail_first > 0:
            script.fail_first -= 1
            return web.json_response({"error": {"message": "overloaded"}}, status=503)
        if script.delay_s:
            await asyncio.sleep(script.delay_s)
        return web.json_response(vllm_response(body, script))

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", completions)
    async with serve(app) as base:
        yield f"{base}/v1"
