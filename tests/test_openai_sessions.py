"""Sessions of the OpenAI endpoint as plain logic: a turn that continues the previous one is prompted with
the previous ids + the sampled ids + the new part's tokens, checked token by token on SmolLM2's ChatML
template (the tiny test model's copy and the converted model's own) and on a second template whose end of
turn is the stop token itself; a rewritten history starts a new segment; the token budget, deadline and max
turns; a retry is answered once."""
from __future__ import annotations

import copy

import pytest

from actors.generator.chat_template import ChatTemplate
from actors.generator.sessions import RequestError, Session, SessionOver, request_key
from policies.infer.sampling import Sample

# ends a turn with <|endoftext|> (SmolLM2's id 0), no newline; a default system turn
PLAIN_TEMPLATE = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nbe brief<|endoftext|>{% endif %}"
                  "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tok():
    from policies.model.loading import load_tokenizer, tiny_dir
    return load_tokenizer(tiny_dir())


@pytest.fixture(scope="module")
def smollm2_tok():
    """SmolLM2-135M-Instruct's own tokenizer where a run converted it (never converted here)."""
    from policies.model.loading import SMOLLM2_NAME, ModelPathError, cache_root, check_model_dir, load_tokenizer
    try:
        return load_tokenizer(check_model_dir(cache_root() / SMOLLM2_NAME))
    except ModelPathError as e:
        pytest.skip(f"SmolLM2 not converted: {e}")


@pytest.fixture(scope="module")
def plain_tok(tok):
    t = copy.deepcopy(tok)
    t.chat_template = PLAIN_TEMPLATE
    return t


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def session(tok, max_tokens=1000, per_turn=50, **kw):
    return Session("s1", ChatTemplate(tok), tok, sampling={"max_new_tokens": per_turn, "temperature": 1.0},
                   max_tokens=max_tokens, deadline=kw.pop("deadline", 100.0), **kw)


def sample(ids, finish="stop", version=3):
    return Sample(list(ids), [-0.5 - i for i in range(len(ids))], [version] * len(ids), finish)


def chat(messages, **kw):
    return {"model": "m", "messages": messages, **kw}


def split_chars(tok, text):
    """A tokenisation of text nobody would re-tokenise to: one token per character."""
    return [t for c in text for t in enc(tok, c)]


@pytest.mark.parametrize("template", ["tiny", "smollm2", "plain"])
def test_a_continued_chat_is_the_previous_ids_the_sampled_ids_and_the_new_tokens(request, template):
    t = request.getfixturevalue({"tiny": "tok", "smollm2": "smollm2_tok", "plain": "plain_tok"}[template])
    tpl = ChatTemplate(t)
    chatml = template != "plain"
    stop = t.convert_tokens_to_ids("<|im_end|>" if chatml else "<|endoftext|>")
    assert tpl.end_of_turn == ("<|im_end|>\n" if chatml else "<|endoftext|>")
    m1 = [{"role": "user", "content": "What is 2+3?"}]
    for reply_ids, finish in [(enc(t, "Let me call the tool.") + [stop], "stop"),   # as the template writes it
                              (split_chars(t, "Let me call the tool.") + [stop], "stop"),  # no re-tokenising
                              (enc(t, "Let me call"), "length")]:                # truncated: no end of turn
        s = session(t)
        p1 = s.plan("chat", chat(m1), now=0.0)
        assert p1.prompt_ids == tpl.encode(tpl.render(m1, True)) and p1.segment is None
        r1 = s.record(p1, sample(reply_ids, finish), created=1)
        reply = r1["choices"][0]["message"]["content"]
        assert reply == t.decode(reply_ids, skip_special_tokens=True)
        m2 = m1 + [{"role": "assistant", "content": reply}, {"role": "tool", "content": "5"},
                   {"role": "user", "content": "So?"}]
        p2 = s.plan("chat", chat(m2), now=1.0)
        assert p2.segment is s.segments[0]
        assert p2.prompt_ids[:len(p1.prompt_ids) + len(reply_ids)] == p1.prompt_ids + reply_ids
        # the new part, token by token, is what the template's own rendering has after the reply
        full = tpl.encode(tpl.render(m2, True))
        canonical_reply = enc(t, reply) + ([stop] if finish == "stop" else [])
        head = p1.prompt_ids + canonical_reply
        if finish == "stop":
            assert full[:len(head)] == head
            assert p2.new_ids == full[len(head):]
        else:  # the template's end of turn follows the truncated reply as prompt tokens
            assert full[:len(head)] == head and p2.new_ids == full[len(head):]
            assert p2.new_ids[0] == stop
        if reply_ids == canonical_reply:
            assert p2.prompt_ids == full  # nothing drifted: exactly the template's tokens
        s.record(p2, sample(enc(t, "It is 5.") + [stop], version=4), created=2)
        seg = s.result()["segments"]
        assert len(seg) == 1
        ids, mask = seg[0]["input_ids"], seg[0]["loss_mask"]
        sampled2 = enc(t, "It is 5.") + [stop]
        assert ids == p2.prompt_ids + sampled2
        want_mask = [False] * len(p1.prompt_ids) + [True] * len(reply_ids) + [False] * len(p2.new_ids) + \
            [True] * len(sampled2)
        assert mask == want_mask
        assert [v for v, m in zip(seg[0]["versions"], mask) if m] == [3] * len(reply_ids) + [4] * len(sampled2)
        assert all(v == -1 and lp == 0.0 for v, lp, m in zip(seg[0]["versions"], seg[0]["logprobs"], mask) if not m)
        assert [lp for lp, m in zip(seg[0]["logprobs"], mask) if m][:2] == [-0.5, -1.5]


def test_a_rewritten_history_starts_a_new_segment(tok):
    s = session(tok)
    m1 = [{"role": "user", "content": "Hi"}]
    s.record(s.plan("chat", chat(m1), 0.0), sample(enc(tok, "Hello!") + [2]), 1)
    # the agent edits the reply it got: not a continuation
    edited = m1 + [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Again"}]
    p = s.plan("chat", chat(edited), 1.0)
    assert p.segment is None
    s.record(p, sample(enc(tok, "Yes") + [2]), 2)
    # the model_dump() of the reply (with its null fields) continues the second segment
    dumped = edited + [{"role": "assistant", "content": "Yes", "refusal": None, "tool_calls": None,
                        "audio": None}, {"role": "user", "content": "Go on"}]
    p3 = s.plan("chat", chat(dumped), 2.0)
    assert p3.segment is s.segments[1]
    s.record(p3, sample(enc(tok, "Ok") + [2]), 3)
    # cut history (the first user turn dropped): a third segment
    p4 = s.plan("chat", chat(dumped[2:]), 3.0)
    assert p4.segment is None
    s.record(p4, sample([5, 6], "length"), 4)
    out = s.result()
    assert [len(x["input_ids"]) for x in out["segments"]] == [len(x["loss_mask"]) for x in out["segments"]]
    assert len(out["segments"]) == 3 and out["turns"] == 4 and out["finish"] == "length"
    assert sum(sum(x["loss_mask"]) for x in out["segments"]) == out["completion_tokens"] == \
        len(enc(tok, "Hello!") + enc(tok, "Yes") + enc(tok, "Ok")) + 3 + 2


def test_the_token_budget_is_over_the_trajectory(tok):
    s = session(tok, max_tokens=10, per_turn=8)
    m = [{"role": "user", "content": "Hi"}]
    p1 = s.plan("chat", chat(m, max_tokens=100), 0.0)
    assert p1.max_new == 8 and not p1.budget_cut and p1.sampling["max_new_tokens"] == 8
    r = s.record(p1, sample(enc(tok, "one two three four five six seven eight")[:8], "length"), 1)
    m2 = m + [{"role": "assistant", "content": r["choices"][0]["message"]["content"]},
              {"role": "user", "content": "more"}]
    p2 = s.plan("chat", chat(m2), 1.0)
    assert p2.max_new == 2 and p2.budget_cut
    s.record(p2, sample([7, 8], "length"), 2)
    assert s.result()["finish"] == "budget" and s.result()["completion_tokens"] == 10
    with pytest.raises(SessionOver, match="token budget") as e:
        s.plan("chat", chat(m2 + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]), 2.0)
    assert e.value.code == "session_budget"
    # turns in flight reserve their tokens: two concurrent turns never overspend
    s2 = session(tok, max_tokens=10, per_turn=8)
    a = s2.plan("chat", chat(m), 0.0)
    b = s2.plan("chat", chat(m + [{"role": "user", "content": "b"}]), 0.0)
    assert (a.max_new, b.max_new) == (8, 2)
    with pytest.raises(SessionOver):
        s2.plan("chat", chat(m + [{"role": "user", "content": "c"}]), 0.0)
    s2.release(b)  # a failed turn frees its share
    assert s2.plan("chat", chat(m + [{"role": "user", "content": "c"}]), 0.0).max_new == 2


def test_deadline_and_max_turns(tok):
    s = session(tok, deadline=5.0, max_turns=2)
    m = [{"role": "user", "content": "Hi"}]
    s.record(s.plan("chat", chat(m), 0.0), sample([5, 2]), 1)
    s.record(s.plan("chat", chat(m + [{"role": "user", "content": "2"}]), 1.0), sample([5, 2]), 2)
    with pytest.raises(SessionOver, match="max_turns=2"):
        s.plan("chat", chat(m + [{"role": "user", "content": "3"}]), 2.0)
    s = session(tok, deadline=5.0)
    with pytest.raises(SessionOver, match="deadline"):
        s.plan("chat", chat(m), 5.0)
    assert s.result()["finish"] == "deadline"


def test_a_retried_request_gets_the_first_answer_and_is_recorded_once(tok):
    s = session(tok)
    body = chat([{"role": "user", "content": "Hi"}], logprobs=True)
    key = request_key("chat", body)
    assert key == request_key("chat", dict(reversed(list(body.items()))))  # the same JSON, any key order
    r = s.record(s.plan("chat", body, 0.0), sample([5, 6, 2]), 1)
    assert s.answers[key] is r and s.turns == 1
    assert r["choices"][0]["logprobs"]["content"][1]["logprob"] == -1.5
    assert r["usage"]["completion_tokens"] == 3 and r["object"] == "chat.completion"


def test_completions_continue_by_text_or_by_token_ids(tok):
    s = session(tok)
    p1 = s.plan("completion", {"prompt": "2+3 ="}, 0.0)
    r1 = s.record(p1, sample(split_chars(tok, " 5"), "length"), 1)
    assert r1["choices"][0]["text"] == " 5" and r1["object"] == "text_completion"
    p2 = s.plan("completion", {"prompt": "2+3 = 5\n4+4 ="}, 1.0)
    assert p2.segment is s.segments[0] and p2.new_ids == enc(tok, "\n4+4 =")
    s.record(p2, sample([9], "length"), 2)
    ids = s.segments[0].input_ids
    p3 = s.plan("completion", {"prompt": ids + [11, 12], "logprobs": True}, 2.0)
    assert p3.segment is s.segments[0] and p3.new_ids == [11, 12]
    r3 = s.record(p3, sample([13], "length"), 3)
    assert r3["choices"][0]["logprobs"]["token_logprobs"] == [-0.5]
    assert len(s.segments) == 1 and sum(s.segments[0].loss_mask) == 2 + 1 + 1


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 0.7}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["\n"]}, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, "top_logprobs"),
])
def test_a_bad_chat_request_names_its_field(tok, body, param):
    s = session(tok)
    with pytest.raises(RequestError) as e:
        s.plan("chat", body, 0.0)
    assert e.value.param == param and param.split("[")[0] in str(e.value)
    assert s.reserved == 0 and s.in_flight == 0


@pytest.mark.parametrize("prompt", ["", [], [-1], [10 ** 9], ["a", "b"], None, 3.5])
def test_a_bad_completion_prompt_is_refused(tok, prompt):
    with pytest.raises(RequestError, match="prompt") as e:
        session(tok).plan("completion", {"prompt": prompt}, 0.0)
    assert e.value.param == "prompt"
