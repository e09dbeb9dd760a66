"""The official OpenAI Python SDK, unchanged, through flowgate (config/examples/openai.toml).

Run by tests/openai_sdk.rs with the gateway's base URL; prints one JSON object of what it saw
and exits non-zero on the first expectation that fails.
"""

import json
import sys

import openai
from openai import OpenAI

base = sys.argv[1]
seen = {}


def client(key):
    # No retries: each denial must be the gateway's first answer, and its headers say whether
    # retrying could help.
    return OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)


demo = client("sk-demo")

# Plain: the response's usage is what the gateway charges.
r = demo.chat.completions.create(
    model="gpt-4o",
    messages=[{"role": "user", "content": "one two three four five"}],
    max_completion_tokens=10,
)
assert r.choices[0].message.content, r
assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 10, r.usage
seen["plain"] = {"prompt": r.usage.prompt_tokens, "completion": r.usage.completion_tokens}

# Streamed with include_usage: chunks, then one carrying the usage.
raw = demo.chat.completions.with_raw_response.create(
    model="gpt-4o-mini",
    messages=[{"role": "user", "content": "a b c d"}],
    stream=True,
    stream_options={"include_usage": True},
)
decision = raw.headers.get("x-flowgate-decision-id")
assert decision, dict(raw.headers)
text, usage = "", None
for chunk in raw.parse():
    for choice in chunk.choices:
        text += choice.delta.content or ""
    if chunk.usage is not None:
        usage = chunk.usage
assert text.startswith("w0 w1"), text
assert usage is not None and usage.completion_tokens == 12, usage
seen["stream"] = {"decision": decision, "prompt": usage.prompt_tokens, "completion": usage.completion_tokens}

# A stream without include_usage: settled too? No usage to read; the estimate is charged.
stream = demo.chat.completions.create(
    model="gpt-4o-mini",
    messages=[{"role": "user", "content": "x"}],
    max_completion_tokens=3,
    stream=True,
)
assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "w0 w1 w2"

# Embeddings.
e = demo.embeddings.create(model="text-embedding-3-small", input=["a b c", "d e"])
assert len(e.data) == 2 and e.usage.prompt_tokens == 5, e
seen["embeddings"] = {"prompt": e.usage.prompt_tokens}

# Denials, as the SDK surfaces them.
try:
    client("sk-nobody").chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    raise AssertionError("an unknown key was served")
except openai.AuthenticationError as err:
    assert err.status_code == 401, err
    seen["unknown_key"] = err.status_code

try:
    demo.chat.completions.create(model="o9-preview", messages=[{"role": "user", "content": "hi"}])
    raise AssertionError("an unpriced model was served")
except openai.BadRequestError as err:
    assert err.body["field"] == "/model", err.body
    seen["unpriced_model"] = err.status_code

tiny = client("sk-tiny")
# The first call fits the 50-credit window: 2 prompt tokens and 4 completion tokens of gpt-4o
# are 45 credits once settled.
tiny.chat.completions.create(
    model="gpt-4o", messages=[{"role": "user", "content": "hello there"}], max_completion_tokens=4
)
try:
    tiny.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "again"}], max_completion_tokens=4
    )
    raise AssertionError("a used-up window was served")
except openai.RateLimitError as err:
    assert err.status_code == 429, err
    assert err.body["type"] == "usage_limit_reached" or err.code == "usage_limit_reached", err.body
    assert int(err.response.headers["retry-after"]) > 0, dict(err.response.headers)
    assert err.response.headers.get("x-should-retry") != "false"
    seen["window"] = {"status": err.status_code, "retry_after": int(err.response.headers["retry-after"])}
try:
    tiny.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "big"}], max_completion_tokens=1000
    )
    raise AssertionError("a request no pool can pay was served")
except openai.RateLimitError as err:
    assert err.code == "insufficient_quota" or err.body.get("type") == "insufficient_quota", err.body
    assert err.response.headers["x-should-retry"] == "false", dict(err.response.headers)
    seen["no_credits"] = {"status": err.status_code, "type": err.body.get("type")}

print(json.dumps(seen))
