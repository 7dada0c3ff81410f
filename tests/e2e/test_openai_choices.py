"""logprobs, `n` choices and the prefix cache, driven by the official `openai` client against
the real agent and the demo model."""
import math
import re

import httpx
import openai
import pytest

from conftest import LLM, Agent

CHAT = [{"role": "user", "content": "Name three rivers of Europe."}]


def test_chat_logprobs_have_openais_shape_and_greedy_picks_the_top(client):
    r = client.chat.completions.create(model=LLM, messages=CHAT, max_tokens=12, temperature=0,
                                       logprobs=True, top_logprobs=5)
    choice = r.choices[0]
    content = choice.logprobs.content
    assert len(content) == r.usage.completion_tokens or choice.finish_reason == "stop"
    assert b"".join(bytes(t.bytes) for t in content).decode() == choice.message.content
    for t in content:
        assert t.logprob <= 0
        assert len(t.top_logprobs) == 5
        lps = [a.logprob for a in t.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        # Greedy: the chosen token is the most likely one, with the same logprob.
        assert (t.top_logprobs[0].token, t.top_logprobs[0].logprob) == (t.token, t.logprob)
        assert bytes(t.top_logprobs[0].bytes) == bytes(t.bytes)
    # The probabilities of the alternatives add up to at most 1.
    assert sum(math.exp(a.logprob) for a in content[0].top_logprobs) <= 1.0 + 1e-4


def test_sampled_tokens_have_their_entry_in_the_top_list(client):
    r = client.chat.completions.create(model=LLM, messages=CHAT, max_tokens=16, temperature=1.0, seed=5,
                                       logprobs=True, top_logprobs=20)
    content = r.choices[0].logprobs.content
    found = 0
    for t in content:
        same = [a for a in t.top_logprobs if a.token == t.token and bytes(a.bytes) == bytes(t.bytes)]
        if same:
            found += 1
            assert same[0].logprob == t.logprob
        else:
            assert t.logprob <= t.top_logprobs[-1].logprob
    assert found > 0


def test_logprobs_off_unless_asked_and_top_logprobs_alone_is_refused(client):
    r = client.chat.completions.create(model=LLM, messages=CHAT, max_tokens=4, temperature=0)
    assert r.choices[0].logprobs is None
    r = client.chat.completions.create(model=LLM, messages=CHAT, max_tokens=4, temperature=0, logprobs=True)
    assert all(t.top_logprobs == [] for t in r.choices[0].logprobs.content)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=LLM, messages=CHAT, max_tokens=4, top_logprobs=3)
    assert e.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=LLM, messages=CHAT, max_tokens=4, logprobs=True, top_logprobs=21)
    assert e.value.body["param"] == "top_logprobs"


def test_completion_logprobs_are_parallel_lists(client):
    r = client.completions.create(model=LLM, prompt="The capital of France is", max_tokens=6,
                                  temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0
    for i, (tok, value, top) in enumerate(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)):
        assert lp.text_offset[i] == len("".join(lp.tokens[:i]))
        assert len(top) == 3
        assert max(top.values()) == top[tok] == value
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=LLM, prompt="Hi", max_tokens=2, logprobs=6)
    assert e.value.body["param"] == "logprobs"


def test_streamed_logprobs_match_the_whole_answer(client):
    kw = dict(model=LLM, messages=CHAT, max_tokens=16, temperature=0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kw).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **kw))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in whole.logprobs.content]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.message.content
    # Each chunk carries the logprobs of its own tokens.
    for c in chunks:
        if c.choices and c.choices[0].delta.content:
            got = b"".join(bytes(t.bytes) for t in c.choices[0].logprobs.content).decode(errors="replace")
            assert got == c.choices[0].delta.content


def test_n_choices_share_one_prompt_and_count_it_once(client):
    one = client.chat.completions.create(model=LLM, messages=CHAT, max_tokens=12, temperature=0.9, seed=11)
    r = client.chat.completions.create(model=LLM, messages=CHAT, max_tokens=12, temperature=0.9, seed=11, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.choices[0].message.content == one.choices[0].message.content, "choice 0 uses the seed itself"
    assert len({c.message.content for c in r.choices}) > 1
    assert r.usage.prompt_tokens == one.usage.prompt_tokens
    assert r.usage.completion_tokens > one.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # Choice i is what seed + i gives alone.
    again = client.chat.completions.create(model=LLM, messages=CHAT, max_tokens=12, temperature=0.9, seed=13)
    assert r.choices[2].message.content == again.choices[0].message.content


def test_n_choices_stream_with_their_index(client):
    kw = dict(model=LLM, prompt="Once upon a time", max_tokens=10, temperature=0.8, seed=3, n=2)
    whole = client.completions.create(**kw)
    texts = ["", ""]
    finishes = {}
    for c in client.completions.create(stream=True, **kw):
        for ch in c.choices:
            texts[ch.index] += ch.text
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    assert texts == [c.text for c in whole.choices]
    assert finishes == {c.index: c.finish_reason for c in whole.choices}


def test_n_over_16_is_refused_naming_n(client):
    for n in (0, 17):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=LLM, messages=CHAT, max_tokens=2, n=n)
        assert e.value.body["param"] == "n"
    r = client.chat.completions.create(model=LLM, messages=CHAT, max_tokens=1, n=16)
    assert len(r.choices) == 16


def test_what_would_change_a_completion_unseen_is_refused(client):
    for kw, param in [(dict(echo=True), "echo"), (dict(best_of=3), "best_of")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=LLM, prompt="Hi", max_tokens=2, **kw)
        assert e.value.body["param"] == param
    assert len(client.completions.create(model=LLM, prompt="Hi", max_tokens=2, n=2, best_of=2).choices) == 2


def metric(agent, name) -> float:
    text = httpx.get(agent.url + "/metrics").text
    m = re.search(rf'^{name}{{model="{LLM}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


SYSTEM = ("You answer questions about the municipal archive of a small town. Be brief and precise; "
          "name the shelf, the box and the year when you know them. ") * 8


def test_a_prefix_cache_hit_gives_the_text_of_a_miss(agent, client):
    kw = dict(model=LLM, max_tokens=16, temperature=0)
    ask = lambda q: client.chat.completions.create(  # noqa: E731
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}], **kw)
    hits, saved = metric(agent, "flatmesh_prefix_cache_hits_total"), metric(agent, "flatmesh_prefix_cache_tokens_total")
    first = ask("Where are the building permits of 1931?")
    second = ask("Where are the building permits of 1931?")
    other = ask("Who signed the harbour charter?")
    assert second.choices[0].message.content == first.choices[0].message.content
    assert second.usage.prompt_tokens_details.cached_tokens > 100
    assert other.usage.prompt_tokens_details.cached_tokens > 100, "the system prompt is shared"
    assert metric(agent, "flatmesh_prefix_cache_hits_total") >= hits + 2
    assert metric(agent, "flatmesh_prefix_cache_tokens_total") >= saved + 200
    # The same request on an agent without the prefix cache gives the same text.
    off = Agent(config=f'[[models]]\nid = "{LLM}"\npath = "{LLM}/model.gguf"\nprefix_cache = false\n')
    try:
        from openai import OpenAI
        c = OpenAI(base_url=off.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        for q, expected in [("Where are the building permits of 1931?", first), ("Who signed the harbour charter?", other)]:
            miss = c.chat.completions.create(
                messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}], **kw)
            assert miss.usage.prompt_tokens_details.cached_tokens == 0
            assert miss.choices[0].message.content == expected.choices[0].message.content
    finally:
        off.stop()
