"""The tool-integrated math example (examples/tool_math) and multi-turn SFT (`messages` rows).

The workflow's tool loop runs against a scripted client (no model) and the real sandbox; the SFT data is
checked token by token against the SmolLM2 chat template (loss on the assistant turns only) and trains.
"""
from __future__ import annotations

from types import SimpleNamespace

import orjson
import pytest

from examples.tool_math.make_sft import make_tool_sft
from examples.tool_math.workflow import TOOL_PROMPT, workflow
from launcher.commands.sft import sft_sequences
from policies.data.dataset import DatasetError, SFTChat, SFTPair, load_sft_pairs


class ScriptedClient:
    """Stands in for openai.AsyncOpenAI: `client.chat.completions.create(**kw)` answers from `turns`, each a
    function of the messages so far (what a model would have read) returning the assistant's text."""

    def __init__(self, turns):
        self.turns, self.seen = list(turns), []
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._create))

    async def _create(self, *, model, messages, **kw):
        self.seen.append([dict(m) for m in messages])
        text = self.turns.pop(0)(messages)
        return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(role="assistant", content=text),
                                                        finish_reason="stop")])


async def test_workflow_runs_the_code_and_feeds_its_output_back():
    problem = {"id": "p1", "prompt": "What is 6 times 7?", "answers": ["42"], "extra": {}, "messages": []}
    client = ScriptedClient([
        lambda m: "Let me compute.\n```python\nx = 6 * 7\nprint(x)\n```",
        lambda m: f"The answer is \\boxed{{{m[-1]['content'].removeprefix('Output: ')}}}.",
    ])
    assert await workflow(problem, client) is None       # the verifier scores the last \boxed{}
    assert len(client.seen) == 2 and not client.turns
    first, second = client.seen
    assert first == [{"role": "user", "content": f"What is 6 times 7? {TOOL_PROMPT}"}]
    assert second[1]["role"] == "assistant" and second[2] == {"role": "user", "content": "Output: 42"}

    # a failing snippet comes back as its error's last line; a turn without code ends the loop
    client = ScriptedClient([lambda m: "```python\nprint(1 / 0)\n```", lambda m: "I give up."])
    await workflow(problem, client)
    assert client.seen[1][-1] == {"role": "user", "content": "Output: ZeroDivisionError: division by zero"}


@pytest.fixture
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


def test_tool_sft_data_has_loss_on_assistant_turns_only(tmp_path, tokenizer):
    paths = make_tool_sft(tmp_path, 4, 2, 3, seed=0)
    plain = load_sft_pairs(paths["sft"])
    chats = load_sft_pairs(paths["sft_tool"])
    assert len(chats) == 3 and all(isinstance(c, SFTChat) for c in chats)
    assert [c.messages[0]["content"] for c in chats] == [f"{p.prompt} {TOOL_PROMPT}" for p in plain]
    seqs = sft_sequences(tokenizer, [*chats, plain[0]])   # conversations and pairs mix in one file
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for chat, seq in zip(chats, seqs):
        ids, mask = seq["input_ids"].tolist(), seq["loss_mask"].tolist()
        assert ids == tokenizer.apply_chat_template(chat.messages, tokenize=True)["input_ids"][:len(ids)]
        spans, cur = [], []    # the runs of trained tokens, each an assistant turn
        for t, m in zip(ids, mask):
            if m:
                cur.append(t)
            elif cur:
                spans.append(cur)
                cur = []
        spans += [cur] if cur else []
        turns = [m["content"] for m in chat.messages if m["role"] == "assistant"]
        assert [tokenizer.decode(s) for s in spans] == [t + "<|im_end|>" for t in turns]
        assert all(s[-1] == end for s in spans) and ids[-1] == end
        untrained = tokenizer.decode([t for t, m in zip(ids, mask) if not m])
        assert "Output: " in untrained and TOOL_PROMPT in untrained and "<|im_start|>assistant" in untrained
    assert sum(seqs[-1]["loss_mask"].tolist()) > 0


def test_sft_trains_on_conversations(tmp_path, tokenizer):
    import torch

    from launcher.commands.sft import train_sft
    from policies.model.loading import tiny_model
    from policies.train.ppo import SFTConfig
    chats = load_sft_pairs(make_tool_sft(tmp_path, 2, 1, 4, seed=1)["sft_tool"])
    model = tiny_model(seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    history = train_sft(model, tokenizer, chats, SFTConfig(epochs=1, batch_size=2, lr=1e-3))
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("row, fault", [
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "x"}]}, "messages[1].role"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}]}, "messages[1].content"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}, "last turn"),
])
def test_bad_conversation_rows_name_line_and_field(tmp_path, row, fault):
    p = tmp_path / "sft.jsonl"
    p.write_bytes(orjson.dumps({"prompt": "P", "response": "R"}) + b"\n" + orjson.dumps(row) + b"\n")
    with pytest.raises(DatasetError) as e:
        load_sft_pairs(p)
    assert "sft.jsonl:2" in str(e.value) and fault in str(e.value)
    assert load_sft_pairs(p, skip_malformed=True) == [SFTPair("P", "R")]
