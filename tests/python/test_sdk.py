"""The official `openai` Python SDK talks to sluice by changing `base_url`, nothing else.

Run by scripts/sdk-test against a real `sluice serve`. Prints one line per check and a
closing 'N passed, N failed' line; exits non-zero on any failure.
"""

import os

import openai

import checks

URL = os.environ["SLUICE_URL"]
client = openai.OpenAI(base_url=f"{URL}/v1", api_key="not-needed-locally", max_retries=0)
MESSAGES = [{"role": "user", "content": "hello"}]
EXPECTED = "Hello from sluice's simulated"


def streams_the_content():
    stream = client.chat.completions.create(
        model="sim", messages=MESSAGES, stream=True, extra_body={"sim": {"tokens": 5}}
    )
    content = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert content == EXPECTED, content


def completes_without_streaming():
    completion = client.chat.completions.create(
        model="sim", messages=MESSAGES, extra_body={"sim": {"tokens": 5}}
    )
    assert completion.choices[0].message.content == EXPECTED, completion
    assert completion.usage.completion_tokens == 5, completion.usage


def idle_timeout_raises_api_error():
    stream = client.chat.completions.create(
        model="sim",
        messages=MESSAGES,
        stream=True,
        extra_body={"sluice": {"idle_timeout_ms": 300}, "sim": {"stall_after": 2}},
    )
    received = []
    try:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    except openai.APIError as e:
        assert "idle" in str(e), str(e)
        assert received == ["Hello", " from"], received
        return
    raise AssertionError(f"no APIError; the stream looked successful after {received}")


def first_token_timeout_is_a_504():
    try:
        client.chat.completions.create(
            model="sim",
            messages=MESSAGES,
            stream=True,
            extra_body={"sluice": {"first_token_timeout_ms": 200}, "sim": {"first_token_ms": 5000}},
        )
    except openai.APIStatusError as e:
        assert e.status_code == 504, e.status_code
        assert e.response.headers.get("x-sluice-stream-id"), e.response.headers
        return
    raise AssertionError("no error for a first-token timeout")


def unknown_model_is_not_found():
    try:
        client.chat.completions.create(model="nope", messages=MESSAGES)
    except openai.NotFoundError as e:
        assert "nope" in str(e), str(e)
        return
    raise AssertionError("no NotFoundError for an unknown model")


def lists_models():
    assert "sim" in [m.id for m in client.models.list()]


CHECKS = [
    streams_the_content,
    completes_without_streaming,
    idle_timeout_raises_api_error,
    first_token_timeout_is_a_504,
    unknown_model_is_not_found,
    lists_models,
]

if __name__ == "__main__":
    checks.run("python-sdk", CHECKS, f"openai {openai.__version__}")
