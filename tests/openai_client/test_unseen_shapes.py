"""Checkpoints of shapes the fixtures lack (MQA, 3 of 6 KV heads, a head_dim that is not
hidden / heads, top-1 and top-3 routing, a p=2 expert norm and none, clip_qkv that cuts hard
and none, a sliding window shorter than the prompts, tied embeddings, 1 to 3 shards), served by `mixserve serve` and read back through the `openai` client, against the
float64 numpy reference in `reference.py`."""

import numpy as np
import openai
import pytest
from conftest import ROOT, running_server

import reference

TOKENIZER = ROOT / "models" / "tiny-mixtral"
CHECKPOINTS = {
    "mixtral-mqa-top1": (reference.make_mixtral, dict(
        hidden=96, heads=6, kv_heads=1, ffn=160, experts=4, top_k=1, layers=3, seed=1)),
    "mixtral-kv3-top3-hd48": (reference.make_mixtral, dict(
        hidden=128, heads=6, kv_heads=3, ffn=96, experts=6, top_k=3, layers=2, head_dim=48,
        seed=2)),
    "mixtral-window5": (reference.make_mixtral, dict(
        hidden=64, heads=4, kv_heads=2, ffn=96, experts=4, top_k=2, layers=2, sliding_window=5,
        seed=5, shards=2)),
    "mixtral-tied-embeddings": (reference.make_mixtral, dict(
        hidden=64, heads=8, kv_heads=8, ffn=64, experts=3, top_k=2, layers=1, tied=True, seed=7,
        shards=1)),
    "dbrx-mqa-top3-clip0.5": (reference.make_dbrx, dict(
        d_model=96, heads=4, kv_heads=1, ffn=64, experts=5, top_k=3, layers=2, clip_qkv=0.5,
        seed=3)),
    "dbrx-top1-pnorm2": (reference.make_dbrx, dict(
        d_model=64, heads=8, kv_heads=4, ffn=48, experts=4, top_k=1, layers=2, clip_qkv=2.0,
        p_norm=2.0, seed=4, shards=3)),
    "dbrx-top2-unnormalised": (reference.make_dbrx, dict(
        d_model=64, heads=4, kv_heads=2, ffn=48, experts=6, top_k=2, layers=2, clip_qkv=None,
        p_norm=None, seed=6)),
}
# f32 against float64: observed differences are below 1e-5.
LOGPROB_TOLERANCE = 1e-4
GREEDY_STEPS = 6


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def checkpoint(request, tmp_path_factory):
    make, kwargs = CHECKPOINTS[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    make(directory, TOKENIZER, **kwargs)
    return directory


def serve(directory, *args):
    return running_server(directory, "--served-model-name", "m", "--kv-cache-memory", "64MiB", *args)


@pytest.fixture(scope="module")
def served(checkpoint):
    with serve(checkpoint) as base:
        yield checkpoint, openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)


def prompts():
    rng = np.random.default_rng(7)
    return [[int(x) for x in rng.integers(3, reference.VOCAB, size=n)] for n in (12, 21)]


def prompt_logprob_errors(directory, client):
    """|served - reference| of every prompt token's logprob but the first, over `prompts()`."""
    errors = []
    for ids in prompts():
        r = client.completions.create(model="m", prompt=ids, max_tokens=0, echo=True, logprobs=1)
        got = r.choices[0].logprobs.token_logprobs
        want = reference.log_softmax(reference.logits(directory, ids))
        assert got[0] is None and len(got) == len(ids)
        errors += [abs(got[i] - want[i - 1, ids[i]]) for i in range(1, len(ids))]
    return np.array(errors)


def test_prompt_logprobs_match_the_reference(served):
    errors = prompt_logprob_errors(*served)
    assert errors.max() < LOGPROB_TOLERANCE, errors


def test_q8_0_prompt_logprobs_stay_close(checkpoint):
    # Issue 5 holds q8_0 to 0.1 on the fixtures (tests/parity.rs). These random models, some
    # without clip_qkv, have larger activations: observed mean 0.008-0.023, max 0.018-0.106.
    with serve(checkpoint, "--quant", "q8_0") as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        errors = prompt_logprob_errors(checkpoint, client)
    assert errors.mean() < 0.05 and errors.max() < 0.25, errors


def test_greedy_continuation_matches_the_reference(served):
    directory, client = served
    for ids in prompts():
        r = client.completions.create(
            model="m", prompt=ids, max_tokens=GREEDY_STEPS, temperature=0, logprobs=1,
            extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True},
        )
        lp = r.choices[0].logprobs
        got = [int(t.removeprefix("token_id:")) for t in lp.tokens]
        seq = list(ids)
        for step in range(GREEDY_STEPS):
            row = reference.log_softmax(reference.logits(directory, seq)[-1])
            top2 = np.sort(row)[-2:]
            if top2[1] - top2[0] < 1e-3:
                break  # a near tie: past it either token is right
            want = int(np.argmax(row))
            assert got[step] == want, f"step {step}: {got} vs reference {want}"
            assert abs(lp.token_logprobs[step] - row[want]) < LOGPROB_TOLERANCE
            seq.append(want)
        else:
            assert len(got) == GREEDY_STEPS
