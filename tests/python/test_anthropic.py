"""Anthropic-shaped clients against sluice: the official `anthropic` Python SDK against
`/v1/messages` over the simulated model (`sim`), an OpenAI-kind upstream (`up`, the mock) and an
Anthropic-kind upstream (`claude`, the mock's Anthropic dialect); and the official `openai` SDK
against the Anthropic-kind model. Run by scripts/sdk-test (SLUICE_URL, SLUICE_MOCK_URL).
"""

import json
import os
import urllib.request

import anthropic
import openai

import checks

URL = os.environ["SLUICE_URL"]
MOCK = os.environ["SLUICE_MOCK_URL"]
client = anthropic.Anthropic(base_url=URL, api_key="not-needed-locally", max_retries=0)
EXPECTED = "Hello from sluice's simulated"
MODELS = ["sim", "up", "claude"]
HI = [{"role": "user", "content": "hello"}]
TOOLS = [
    {
        "name": "lookup",
        "description": "look something up",
        "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}},
    }
]


def get_json(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def creates_a_message_on_every_kind_of_model():
    for model in MODELS:
        m = client.messages.create(
            model=model, max_tokens=100, messages=HI, system="be brief", extra_body={"sim": {"tokens": 5}}
        )
        assert m.type == "message" and m.role == "assistant", m
        assert m.content[0].text == EXPECTED, (model, m.content)
        assert m.stop_reason == "end_turn", (model, m.stop_reason)
        assert m.usage.output_tokens == 5, (model, m.usage)


def streams_a_message_on_every_kind_of_model():
    for model in MODELS:
        with client.messages.stream(
            model=model, max_tokens=100, messages=HI, extra_body={"sim": {"tokens": 5}}
        ) as s:
            text = "".join(s.text_stream)
            final = s.get_final_message()
        assert text == EXPECTED, (model, text)
        assert final.content[0].text == EXPECTED, (model, final)
        assert final.stop_reason == "end_turn"


def tool_use_comes_back_as_tool_use_blocks():
    for model in ["sim", "claude"]:
        with client.messages.stream(
            model=model,
            max_tokens=100,
            messages=[{"role": "user", "content": "use the tool"}],
            tools=TOOLS,
            extra_body={"sim": {"tokens": 2, "tool_call": True}},
        ) as s:
            final = s.get_final_message()
        calls = [b for b in final.content if b.type == "tool_use"]
        assert calls and calls[0].name == "lookup", (model, final.content)
        assert calls[0].input == {"query": "sluice"}, (model, calls[0].input)
        assert final.stop_reason == "tool_use", (model, final.stop_reason)
        # The tool loop: a tool_result goes back.
        follow_up = client.messages.create(
            model=model,
            max_tokens=100,
            messages=[
                {"role": "user", "content": "use the tool"},
                {"role": "assistant", "content": [c.model_dump() for c in final.content]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": calls[0].id, "content": "42"}]},
            ],
            tools=TOOLS,
            extra_body={"sim": {"tokens": 3}},
        )
        assert follow_up.stop_reason == "end_turn", follow_up


def a_timeout_is_an_error():
    try:
        with client.messages.stream(
            model="sim",
            max_tokens=100,
            messages=HI,
            extra_body={"sim": {"stall_after": 2}, "sluice": {"idle_timeout_ms": 300}},
        ) as s:
            text = "".join(s.text_stream)
    except anthropic.APIError as e:
        assert "idle" in str(e), str(e)
        return
    raise AssertionError(f"no error; the stream looked successful after {text!r}")


def cancel_stops_the_upstream_and_the_replay_keeps_the_shape():
    disconnected = get_json(f"{MOCK}/stats")["requests_disconnected"]
    with client.messages.stream(
        model="up", max_tokens=100, messages=HI, extra_body={"sim": {"tokens": 100000, "token_interval_ms": 10}}
    ) as s:
        sid = s.response.headers["x-sluice-stream-id"]
        received = []
        try:
            for text in s.text_stream:
                received.append(text)
                if len(received) == 3:
                    req = urllib.request.Request(f"{URL}/v1/streams/{sid}/cancel", method="POST")
                    urllib.request.urlopen(req, timeout=10).read()
        except anthropic.APIError as e:
            assert "requested" in str(e), str(e)
        else:
            raise AssertionError("a cancelled stream ended without an error")
    assert get_json(f"{MOCK}/stats")["requests_disconnected"] > disconnected
    replay = urllib.request.urlopen(f"{URL}/v1/streams/{sid}/events", timeout=10).read().decode()
    assert replay.startswith("event: message_start"), replay[:200]
    assert "event: content_block_delta" in replay and "event: error" in replay, replay[-300:]


def the_openai_sdk_talks_to_an_anthropic_model():
    o = openai.OpenAI(base_url=f"{URL}/v1", api_key="not-needed-locally", max_retries=0)
    stream = o.chat.completions.create(
        model="claude", messages=HI, stream=True, extra_body={"sim": {"tokens": 5}}
    )
    content = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert content == EXPECTED, content


CHECKS = [
    creates_a_message_on_every_kind_of_model,
    streams_a_message_on_every_kind_of_model,
    tool_use_comes_back_as_tool_use_blocks,
    a_timeout_is_an_error,
    cancel_stops_the_upstream_and_the_replay_keeps_the_shape,
    the_openai_sdk_talks_to_an_anthropic_model,
]

if __name__ == "__main__":
    checks.run("anthropic", CHECKS, f"anthropic {anthropic.__version__}, openai {openai.__version__}")
