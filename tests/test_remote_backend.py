"""The `openai` backend against an in-suite server that answers in vLLM's response shape."""

from __future__ import annotations

import base64
import io
import math
import re

import pytest
from aiohttp import web
from PIL import Image

from daemon.inference.openai_backend import (
    MAX_ANSWER_BYTES,
    OpenAIBackend,
    RemoteError,
    _retry_after,
    choice_from_logprobs,
    label_of_token,
)
from daemon.plugin_api import ChoiceQuery, ModelLoadError, ModelRequest
from tests.conftest import (
    EXTRACT_RULE,
    FIRE_RULE,
    free_port,
    make_alert,
    make_settings,
    run_daemon,
    serve,
)
from tests.openai_server import Script, openai_server


def remote_settings(tmp_path, url: str, **remote):
    settings = make_settings(tmp_path, broker=None, model=tmp_path / "unused")
    model = settings.model.model_copy(
        update={
            "backend": "openai",
            "path": "Qwen/Qwen2-VL-7B-Instruct",
            "remote": settings.model.remote.model_copy(
                update={"url": url, "retry_backoff_s": 0.01, **remote}
            ),
        }
    )
    settings = settings.model_copy(update={"model": model})
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    (settings.rules.dir / "people.toml").write_text(EXTRACT_RULE)
    (settings.rules.dir / "smoke.toml").write_text(
        FIRE_RULE.replace('"fire"', '"smoke"') + 'on_error = "drop"\n'
    )
    return settings


def lse(*values: float) -> float:
    return math.log(sum(math.exp(v) for v in values))


async def review(settings, *alerts):
    async with run_daemon(settings) as d:
        for alert in alerts:
            status, body = await d.post_alert(alert)
            assert status == 202, body
        return [(await d.wait_reviewed(a["alert_id"]))["verdicts"] for a in alerts]


async def test_verdict_confidence_comes_from_the_first_tokens_logprobs(tmp_path):
    script = Script()
    async with openai_server(script) as url:
        [[verdict]] = await review(remote_settings(tmp_path, url), make_alert("r-1"))
    yes, no = lse(-0.25, -3.2), lse(-1.7, -4.0)
    assert verdict["confidence"] == pytest.approx(1 / (1 + math.exp(no - yes)), abs=1e-9)
    assert verdict["model"] == "Qwen2-VL-7B-Instruct"  # [model] name defaults to the last part
    [body] = script.requests
    assert body["max_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 20
    assert body["model"] == "Qwen/Qwen2-VL-7B-Instruct" and body["temperature"] == 0
    image_part, text_part = body["messages"][0]["content"]
    assert text_part == {"type": "text", "text": "Is there a real open flame? Answer yes or no."}
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as sent:
        assert sent.size == (588, 336)  # the 640x360 snapshot scaled to the token budget


async def test_a_label_missing_from_the_top_logprobs_gets_a_bound_from_the_lowest_listed(
    tmp_path,
):
    script = Script(top_logprobs={"Yes": -1.5, "The": -3.0})
    async with openai_server(script) as url:
        [[verdict]] = await review(remote_settings(tmp_path, url), make_alert("r-2"))
    # each of "no"'s six forms (no, No, NO, " no" ...) below the least listed token (and
    # together below the 73 % the listed tokens leave)
    no = -3.0 + math.log(6)
    assert verdict["confidence"] == pytest.approx(1 / (1 + math.exp(no + 1.5)), abs=1e-9)


async def test_without_logprobs_the_answer_text_decides(tmp_path):
    script = Script(top_logprobs=None, text="No, it is a lamp.")
    async with openai_server(script) as url:
        [[verdict]] = await review(remote_settings(tmp_path, url), make_alert("r-3"))
    assert verdict["verdict"] == "rejected" and verdict["confidence"] == 0.0


async def test_extraction_sends_the_rules_json_schema(tmp_path):
    script = Script(text='{"people": 3}')
    async with openai_server(script) as url:
        [[verdict]] = await review(
            remote_settings(tmp_path, url), make_alert("r-4", event_type="people_gathering")
        )
    assert verdict["verdict"] == "confirmed" and verdict["fields"] == {"people": 3}
    [body] = script.requests
    assert body["max_tokens"] == 24 and "logprobs" not in body
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {
            "name": "fields",
            "schema": {
                "type": "object",
                "properties": {
                    "people": {"type": "integer", "description": "number of people visible"}
                },
                "required": ["people"],
                "additionalProperties": False,
            },
        },
    }


async def test_server_errors_are_retried_with_backoff(tmp_path):
    script = Script(fail_first=2)
    async with openai_server(script) as url:
        [[verdict]] = await review(remote_settings(tmp_path, url, max_retries=3), make_alert("r-5"))
    assert verdict["confidence"] is not None and len(script.requests) == 3


async def test_a_timeout_ends_in_the_rules_on_error(tmp_path):
    script = Script(delay_s=2.0)
    async with openai_server(script) as url:
        settings = remote_settings(tmp_path, url, timeout_s=0.3, max_retries=1)
        [[forwarded], dropped] = await review(
            settings, make_alert("r-6"), make_alert("r-7", event_type="smoke")
        )
    assert forwarded["verdict"] == "unreviewed"
    assert (
        "no answer from" in forwarded["reason"]
        and "within 0.3 s (after 2 attempts)" in forwarded["reason"]
    )
    assert dropped == []
    assert len(script.requests) == 4  # two alerts, two attempts each


async def test_a_server_that_is_down_ends_in_the_rules_on_error(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    [[verdict]] = await review(remote_settings(tmp_path, url, max_retries=2), make_alert("r-8"))
    assert verdict["verdict"] == "unreviewed"
    assert "Cannot connect" in verdict["reason"] and "(after 3 attempts)" in verdict["reason"]


async def test_the_api_key_comes_from_a_credentials_file_and_is_checked(tmp_path):
    key_file = tmp_path / "api_key"
    key_file.write_text("s3cret\n")
    script = Script(api_key="s3cret")
    async with openai_server(script) as url:
        [[ok]] = await review(
            remote_settings(tmp_path, url, api_key_file=key_file), make_alert("r-9")
        )
        wrong = tmp_path / "wrong_key"
        wrong.write_text("nope")
        other = tmp_path / "other"
        other.mkdir()
        [[refused]] = await review(
            remote_settings(other, url, api_key_file=wrong), make_alert("r-10")
        )
    assert ok["confidence"] is not None
    assert script.headers[0]["Authorization"] == "Bearer s3cret"
    assert refused["verdict"] == "unreviewed" and "HTTP 401" in refused["reason"]
    assert len(script.requests) == 2  # a refused key is not retried


def _completion(top: object) -> dict:
    """vLLM's shape with the given first token's `top_logprobs`."""
    first = {"token": "No", "logprob": -0.01, "bytes": [78, 111], "top_logprobs": top}
    return {
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "No"},
             "logprobs": {"content": [first]}, "finish_reason": "length"}
        ]
    }  # fmt: skip


HOSTILE = {
    # logprobs that are no log-probabilities: never a verdict
    "nan": (_completion([{"token": "Yes", "logprob": math.nan}]), "no log-probability"),
    "positive": (_completion([{"token": "Yes", "logprob": 40.0}]), "no log-probability"),
    # a numeric string is read as its number
    "text": (
        _completion([{"token": "Yes", "logprob": "-0.1"}, {"token": "No", "logprob": -3}]),
        "yes",  # answered: the likelier label
    ),
    # no alternatives (a server that ignores top_logprobs): the chosen token's own logprob
    "alone": (_completion([]), "no"),
    # errors answered with status 200 (gateways do): their own message
    "error-body": (
        {"error": {"message": "upstream overloaded", "code": 400}},
        "upstream overloaded",
    ),
    "vllm-error": ({"object": "error", "message": "bad image", "code": 400}, "an error: bad image"),
    "word": (_completion([{"token": "Yes", "logprob": "high"}]), "not a number"),
    "old-style": (_completion({"Yes": -0.1}), "top_logprobs is dict"),
    "entry": (_completion(["Yes"]), "no {token, logprob} entry"),
    "message": ({"choices": [{"message": "Yes"}]}, "choices[0] has no message"),
}


async def test_answers_that_are_no_log_probabilities_or_no_json_fail_the_request(tmp_path):
    mode = {"name": "nan"}

    async def answer(request: web.Request) -> web.StreamResponse:
        name = mode["name"]
        if name == "html":
            return web.Response(text="<html>gateway</html>", content_type="text/html")
        if name == "huge":
            response = web.StreamResponse()
            await response.prepare(request)
            for _ in range(80):  # 5 MB of an endless-looking body
                await response.write(b" " * 2**16)
            return response
        if name == "latin-404":
            return web.Response(status=404, body="introuvable: modèle".encode("latin-1"))
        return web.json_response(HOSTILE[name][0])

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    async with serve(app) as base:
        settings = remote_settings(tmp_path, f"{base}/v1", max_retries=0).model
        backend = OpenAIBackend(settings)
        await backend.start()
        request = ModelRequest(ChoiceQuery("Fire?", {"yes": ["Yes"], "no": ["No"]}))
        try:
            for name, (_, message) in HOSTILE.items():
                mode["name"] = name
                if message in ("yes", "no"):
                    answer_ = await backend.run(request)
                    assert answer_.probabilities[message] > 0.5, name
                    continue
                with pytest.raises(RemoteError, match=re.escape(message)):
                    await backend.run(request)
            for name, message in [
                ("html", "answered text/html; charset=utf-8 that is no JSON"),
                ("huge", f"answered more than {MAX_ANSWER_BYTES} bytes"),
                ("latin-404", "HTTP 404 from"),
            ]:
                mode["name"] = name
                with pytest.raises(RemoteError, match=re.escape(message)):
                    await backend.run(request)
        finally:
            await backend.close()


async def test_an_error_body_of_a_passing_kind_is_retried(tmp_path):
    asked = []

    async def answer(request: web.Request) -> web.Response:
        asked.append(1)
        if len(asked) == 1:  # status 200, the error in the body (as some gateways answer)
            return web.json_response({"error": {"message": "overloaded", "code": 503}})
        return web.json_response(_completion([{"token": "No", "logprob": -0.01}]))

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    async with serve(app) as base:
        backend = OpenAIBackend(remote_settings(tmp_path, f"{base}/v1", max_retries=2).model)
        await backend.start()
        try:
            request = ModelRequest(ChoiceQuery("Fire?", {"yes": ["Yes"], "no": ["No"]}))
            assert (await backend.run(request)).probabilities["no"] > 0.5
        finally:
            await backend.close()
    assert len(asked) == 2


async def test_a_key_file_of_more_than_one_line_stops_the_start_naming_it(tmp_path):
    key_file = tmp_path / "api_key"
    key_file.write_text("first line\nsecond line\n")
    settings = remote_settings(tmp_path, "http://127.0.0.1:9/v1", api_key_file=key_file).model
    with pytest.raises(ModelLoadError, match=r"api_key_file .*api_key: the key must be one line"):
        await OpenAIBackend(settings).start()


def test_waits_between_attempts_are_capped_and_honour_retry_after():
    assert _retry_after({"Retry-After": "12"}) == 12.0
    for nonsense in ("Wed, 21 Oct 2026 07:28:00 GMT", "-5", "nan", "inf"):
        assert _retry_after({"Retry-After": nonsense}) is None


def test_labels_of_several_tokens_are_scored_from_the_token_that_begins_them():
    choices = {
        "forklift": ["forklift", "Forklift", " forklift"],
        "pedestrian": ["pedestrian", "Pedestrian", " pedestrian"],
        "person": ["person", "Person"],
    }
    top = [
        {"token": token, "logprob": logprob}
        for token, logprob in [("fork", -0.4), ("Fork", -2.5), ("ped", -2.6), ("p", -3.0)]
    ]
    answer = choice_from_logprobs(top, choices)
    assert answer is not None
    # "p" begins two labels' forms, and is too short to name one: the lowest listed stands
    # in, for each of the two forms of "person"
    scores = {"forklift": lse(-0.4, -2.5), "pedestrian": -2.6, "person": -3.0 + math.log(2)}
    assert answer.logits == pytest.approx(scores)
    assert answer.probabilities["forklift"] > 0.8
    assert choice_from_logprobs([{"token": "The", "logprob": -0.1}], choices) is None


def test_a_label_left_out_of_a_short_list_never_outweighs_what_is_listed():
    choices = {"yes": ["yes", "Yes", " yes", " Yes", "YES", " YES"], "no": ["no", "No"]}
    for listed, p_yes in (("Yes", 0.99), ("No", 0.01)):  # top_logprobs = 1
        answer = choice_from_logprobs([{"token": listed, "logprob": math.log(0.99)}], choices)
        assert answer is not None
        assert answer.probabilities["yes"] == pytest.approx(p_yes)
    # the unlisted label gets what the listed tokens leave, when that is below its bound
    top = [{"token": "Yes", "logprob": math.log(0.6)}, {"token": "The", "logprob": math.log(0.3)}]
    answer = choice_from_logprobs(top, choices)
    assert answer is not None and answer.logits["no"] == pytest.approx(math.log(0.1))


def test_a_token_names_the_label_it_equals_and_a_short_one_no_label_it_begins():
    choices = {
        "intruder": ["intruder", "Intruder"],
        "animal": ["animal", "Animal"],
        "vehicle": ["vehicle", "Vehicle"],
    }
    top = [("The", -0.6), ("I", -1.6), ("A", -2.3), ("vehicle", -3.0), ("Anim", -3.5)]
    answer = choice_from_logprobs([{"token": t, "logprob": v} for t, v in top], choices)
    assert answer is not None  # "I" and "A" begin words of every kind: they name nothing
    assert answer.logits == pytest.approx(
        {"intruder": -3.5 + math.log(2), "animal": -3.5, "vehicle": -3.0}
    )
    fire = {"fire": ["fire", "Fire"], "fireworks": ["fireworks", "Fireworks"]}
    assert label_of_token("fire", fire) == "fire"  # a whole form, though it begins another
    assert label_of_token("firew", fire) == "fireworks"


def test_labels_a_first_token_could_not_tell_apart_are_refused_for_a_remote_server(tmp_path):
    backend = OpenAIBackend(remote_settings(tmp_path, "http://127.0.0.1:9/v1").model)
    with pytest.raises(ValueError, match="'fireworks' begins with answer 'fire'"):
        backend.check_choices({"fire": ["fire", " Fire"], "fireworks": ["fireworks"]})
    backend.check_choices({"yes": ["yes", "Yes", " yes"], "no": ["no", "No", " no"]})


async def test_without_logprobs_a_first_token_that_begins_a_label_names_it(tmp_path):
    script = Script(top_logprobs=None, text="forklift")  # one token of it: "fork"
    async with openai_server(script) as url:
        settings = remote_settings(tmp_path, url).model
        backend = OpenAIBackend(settings)
        await backend.start()
        choices = {"forklift": ["forklift", "Forklift"], "pedestrian": ["pedestrian"]}
        try:
            answer = await backend.run(ModelRequest(ChoiceQuery("What?", choices)))
        finally:
            await backend.close()
    assert answer.probabilities == {"forklift": 1.0, "pedestrian": 0.0}


async def test_an_answer_without_text_fails_the_review_and_counts_as_a_failure(tmp_path):
    async def refuse(request: web.Request) -> web.Response:
        message = {"role": "assistant", "content": None, "refusal": "I cannot help with that"}
        return web.json_response({"choices": [{"message": message, "finish_reason": "stop"}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", refuse)
    async with serve(app) as base:
        settings = remote_settings(tmp_path, f"{base}/v1", max_retries=0)
        alert = make_alert("r-refused", event_type="people_gathering")
        async with run_daemon(settings) as d:
            assert (await d.post_alert(alert))[0] == 202
            [verdict] = (await d.wait_reviewed("r-refused"))["verdicts"]
            worker = (await d.daemon.health())["model_worker"]
    assert verdict["verdict"] == "unreviewed"
    assert "no text content: I cannot help with that" in verdict["reason"]
    assert worker["failures"] == 1 and "I cannot help" in worker["last_error"]


async def test_logprobs_without_any_label_are_no_answer_whatever_the_text_says(tmp_path):
    script = Script(top_logprobs={"The": -0.1, "A": -2.0}, text="Yes")
    async with openai_server(script) as url:
        [[verdict]] = await review(remote_settings(tmp_path, url), make_alert("r-none"))
    assert verdict["verdict"] == "unreviewed"
    assert "none of yes, no among the answer's likeliest first tokens" in verdict["reason"]


async def test_a_redirect_is_refused_and_the_snapshot_goes_nowhere_else(tmp_path):
    elsewhere = Script()
    async with openai_server(elsewhere) as other:

        async def moved(request: web.Request) -> web.Response:
            raise web.HTTPTemporaryRedirect(f"{other}/chat/completions")

        app = web.Application()
        app.router.add_post("/v1/chat/completions", moved)
        async with serve(app) as base:
            settings = remote_settings(tmp_path, f"{base}/v1", max_retries=2)
            async with run_daemon(settings) as d:
                assert (await d.post_alert(make_alert("r-moved")))[0] == 202
                [verdict] = (await d.wait_reviewed("r-moved"))["verdicts"]
                worker = (await d.daemon.health())["model_worker"]
    assert verdict["verdict"] == "unreviewed" and "HTTP 307" in verdict["reason"]
    assert f"redirects to {other}/chat/completions" in verdict["reason"]
    assert elsewhere.requests == []  # and it was not retried either
    assert worker["failures"] == 1 and worker["failing_in_a_row"] == 1
    assert "HTTP 307" in worker["last_error"]


async def test_the_api_key_file_is_read_again_on_reload(tmp_path):
    key_file = tmp_path / "api_key"
    key_file.write_text("old-key\n")
    script = Script(api_key="old-key")
    async with openai_server(script) as url:
        settings = remote_settings(tmp_path, url, api_key_file=key_file)
        async with run_daemon(settings) as d:
            assert (await d.post_alert(make_alert("k-1")))[0] == 202
            await d.wait_reviewed("k-1")
            # the key is rotated: the file and the server change, then SIGHUP
            key_file.write_text("new-key\n")
            script.api_key = "new-key"
            d.daemon.reload()
            assert (await d.post_alert(make_alert("k-2")))[0] == 202
            [rotated] = (await d.wait_reviewed("k-2"))["verdicts"]
            # a file that cannot be used keeps the key in force
            key_file.write_text("two\nlines\n")
            d.daemon.reload()
            assert (await d.post_alert(make_alert("k-3")))[0] == 202
            [kept] = (await d.wait_reviewed("k-3"))["verdicts"]
    assert rotated["confidence"] is not None and kept["confidence"] is not None
    assert [h["Authorization"] for h in script.headers] == [
        "Bearer old-key",
        "Bearer new-key",
        "Bearer new-key",
    ]
