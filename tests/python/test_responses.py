"""OpenAI's Responses API served by sluice over the simulated model and an OpenAI-kind upstream
(`sluice mock-upstream`), driven by the official `openai` Python SDK with only `base_url` changed.

Run by scripts/python-sdk-test, which starts the gateway (models `sim` and `up`, the latter at the
mock) and sets SLUICE_URL and SLUICE_MOCK_URL. Every streamed event is validated against the SDK's
own event types (pydantic, strict about required fields and literals).
"""

import json
import os
import time
import urllib.request

import openai
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

import checks

URL = os.environ["SLUICE_URL"]
MOCK = os.environ["SLUICE_MOCK_URL"]
client = openai.OpenAI(base_url=f"{URL}/v1", api_key="not-needed-locally", max_retries=0)
EVENT = TypeAdapter(ResponseStreamEvent)
EXPECTED = "Hello from sluice's simulated"


def get_json(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def checked(events):
    """Each event validated against the SDK's types; sequence numbers strictly increasing."""
    seen = []
    for event in events:
        EVENT.validate_python(event.to_dict())
        if seen:
            assert event.sequence_number > seen[-1].sequence_number, (seen[-1], event)
        seen.append(event)
    return seen


def text_of(events):
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


def creates_a_response():
    r = client.responses.create(model="sim", input="hello", extra_body={"sim": {"tokens": 5}})
    assert r.status == "completed", r
    assert r.output_text == EXPECTED, r.output_text
    assert r.usage.output_tokens == 5, r.usage
    assert r.id.startswith("resp_"), r.id
    # It is a sluice stream too.
    listed = get_json(f"{URL}/v1/streams?limit=5")["data"]
    assert r.id in [s["id"] for s in listed], listed
    assert client.responses.retrieve(r.id).output_text == EXPECTED


def streams_a_response():
    events = checked(
        client.responses.create(
            model="up", input="hello", stream=True, extra_body={"sim": {"tokens": 5}}
        )
    )
    types = [e.type for e in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ], types
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ], types
    assert text_of(events) == EXPECTED
    assert events[-1].response.output_text == EXPECTED


def background_stream_resumes_after_a_dropped_connection_exactly_once():
    stream = client.responses.create(
        model="sim",
        input="a long one",
        background=True,
        stream=True,
        extra_body={"sim": {"tokens": 80, "token_interval_ms": 15}},
    )
    before = []
    for event in stream:
        before.append(event)
        if sum(e.type == "response.output_text.delta" for e in before) == 5:
            break
    stream.close()  # the connection drops mid-answer; background keeps the answer going
    checked(before)
    rid = before[0].response.id
    last = before[-1].sequence_number
    rest = checked(client.responses.retrieve(rid, stream=True, starting_after=last))
    assert rest[0].sequence_number > last, (last, rest[0])
    assert rest[-1].type == "response.completed", rest[-1].type
    whole = client.responses.retrieve(rid).output_text
    assert text_of(before) + text_of(rest) == whole, (text_of(before), text_of(rest), whole)
    # The SDK's helper replays from the start and filters itself: the same final text.
    with client.responses.stream(response_id=rid, starting_after=last) as s:
        final = s.get_final_response()
    assert final.output_text == whole, final.output_text


def cancel_stops_the_upstream():
    disconnected = get_json(f"{MOCK}/stats")["requests_disconnected"]
    r = client.responses.create(
        model="up",
        input="go on forever",
        background=True,
        extra_body={"sim": {"tokens": 100000, "token_interval_ms": 10}},
    )
    assert r.status == "in_progress", r.status
    time.sleep(0.3)
    c = client.responses.cancel(r.id)
    assert c.status == "cancelled", c.status
    assert c.output_text, "what arrived stays"
    for _ in range(50):
        if get_json(f"{MOCK}/stats")["requests_disconnected"] > disconnected:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the upstream request was not closed")
    try:
        client.responses.cancel(r.id)
    except openai.BadRequestError as e:
        assert "in progress" in str(e), str(e)
    else:
        raise AssertionError("cancelling a cancelled response should be a 400")


def previous_response_id_continues_the_conversation():
    first = client.responses.create(model="sim", input="my name is Ada", extra_body={"sim": {"tokens": 3}})
    second = client.responses.create(
        model="sim",
        input="what is my name?",
        previous_response_id=first.id,
        instructions="answer briefly",
    )
    assert second.status == "completed"
    sent = get_json(f"{URL}/v1/streams/{second.id}")["request"]
    conversation = sent["sluice_conversation"]
    assert [m["role"] for m in conversation] == ["user", "assistant", "user"], conversation
    assert conversation[1]["content"] == first.output_text
    items = client.responses.input_items.list(second.id)
    assert [i.content[0].text for i in items.data] == ["what is my name?"], items


def a_timeout_is_incomplete():
    r = client.responses.create(
        model="sim",
        input="then go quiet",
        extra_body={"sim": {"stall_after": 2}, "sluice": {"idle_timeout_ms": 300}},
    )
    assert r.status == "incomplete", r.status
    assert r.output_text == "Hello from", r.output_text
    events = checked(
        client.responses.create(
            model="sim",
            input="then go quiet",
            stream=True,
            extra_body={"sim": {"stall_after": 2}, "sluice": {"idle_timeout_ms": 300}},
        )
    )
    assert events[-1].type == "response.incomplete", events[-1].type
    assert events[-1].response.to_dict()["sluice"]["reason"] == "idle"


def tool_calls_become_function_call_items_and_events():
    tools = [
        {
            "type": "function",
            "name": "lookup",
            "description": "look something up",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        }
    ]
    events = checked(
        client.responses.create(
            model="sim",
            input="use the tool",
            tools=tools,
            stream=True,
            extra_body={"sim": {"tokens": 2, "tool_call": True}},
        )
    )
    types = [e.type for e in events]
    assert "response.function_call_arguments.delta" in types, types
    done = [e for e in events if e.type == "response.function_call_arguments.done"][0]
    assert (done.name, done.arguments) == ("lookup", '{"query":"sluice"}'), done
    final = events[-1].response
    assert final.status == "completed", final.status
    call = [o for o in final.output if o.type == "function_call"][0]
    assert call.name == "lookup" and call.arguments == '{"query":"sluice"}', call
    # The tool loop: its output goes back as the next input.
    follow_up = client.responses.create(
        model="sim",
        previous_response_id=final.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "42"}],
        extra_body={"sim": {"tokens": 3}},
    )
    assert follow_up.status == "completed", follow_up.status
    sent = get_json(f"{URL}/v1/streams/{follow_up.id}")["request"]["sluice_conversation"]
    assert sent[1]["tool_calls"][0]["id"] == call.call_id, sent
    assert sent[2] == {"role": "tool", "tool_call_id": call.call_id, "content": "42"}, sent


def a_deleted_response_is_gone():
    r = client.responses.create(model="sim", input="forget me", extra_body={"sim": {"tokens": 2}})
    deleted = client.responses.delete(r.id)
    assert deleted is None or getattr(deleted, "deleted", True), deleted
    try:
        client.responses.retrieve(r.id)
    except openai.NotFoundError:
        return
    raise AssertionError("a deleted response is still there")


def an_unknown_response_is_not_found():
    for call in (
        lambda: client.responses.retrieve("resp_nope"),
        lambda: client.responses.cancel("resp_nope"),
        lambda: client.responses.input_items.list("resp_nope"),
    ):
        try:
            call()
        except openai.NotFoundError:
            continue
        raise AssertionError("expected a 404")


CHECKS = [
    creates_a_response,
    streams_a_response,
    background_stream_resumes_after_a_dropped_connection_exactly_once,
    cancel_stops_the_upstream,
    previous_response_id_continues_the_conversation,
    a_timeout_is_incomplete,
    tool_calls_become_function_call_items_and_events,
    a_deleted_response_is_gone,
    an_unknown_response_is_not_found,
]

if __name__ == "__main__":
    checks.run("responses", CHECKS, f"openai {openai.__version__}")
