"""The official `openai` package, unmodified, against `mixserve serve`."""

import json
from pathlib import Path

import openai
import pytest
from conftest import API_KEY

MODEL = "tiny-mixtral"
REFERENCE = json.loads(
    (Path(__file__).resolve().parents[1] / "fixtures" / "tiny-mixtral" / "reference.json").read_text()
)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0)


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_greedy_matches_reference(client):
    prompt = REFERENCE["prompts"][0]
    r = client.completions.create(
        model=MODEL, prompt=prompt["text"], max_tokens=24, temperature=0
    )
    assert r.object == "text_completion"
    assert r.choices[0].text.strip() == prompt["greedy_text"].strip()
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + 24


def test_completion_stream_equals_non_stream_when_seeded(client):
    args = dict(model=MODEL, prompt="Mixture of experts", max_tokens=20, temperature=0.8, seed=11)
    whole = client.completions.create(**args).choices[0].text
    chunks = list(client.completions.create(stream=True, **args))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_completion_n_stop_and_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, n=3, seed=3, temperature=1.0)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    full = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0).choices[0].text
    stop = full[3:6]
    cut = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    lp = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0, logprobs=2)
    logprobs = lp.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    assert "".join(logprobs.tokens) == lp.choices[0].text
    assert all(len(t) == 2 for t in logprobs.top_logprobs)


def test_echo_logprobs_for_scoring(client):
    # What lm-evaluation-harness's local-completions does to score a continuation.
    r = client.completions.create(
        model=MODEL, prompt="The capital of France is Paris", max_tokens=0, echo=True, logprobs=1
    )
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "The capital of France is Paris"
    assert lp.token_logprobs[0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp.token_logprobs[1:])


def test_chat_and_stream_with_usage(client):
    messages = [{"role": "user", "content": "Hello! Who are you?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0.7, seed=5)
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(REFERENCE["chat"][0]["prompt_ids"])
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0.7, seed=5,
        stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == r.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [r.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_chat_logprobs_and_n(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "2+2?"}], max_tokens=6,
        logprobs=True, top_logprobs=3, n=2, seed=9,
    )
    assert len(r.choices) == 2
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert all(len(t.top_logprobs) == 3 for t in content)


def test_error_classes(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=10, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=5000)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
        )
    assert "Conversation roles must alternate" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    bad = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
