"""A tokenizer's chat template as a multi-turn session needs it: prompts, and the tokens between turns.

Re-tokenising a conversation each turn would not give back the tokens the policy sampled (a reply
re-encoded may split differently, a truncated reply gains an end of turn), so the learner would train on
tokens nobody sampled. Instead a turn that continues the previous one (its messages are the previous
messages + the reply we gave + new ones) is prompted with the previous prompt ids + the sampled ids + the
tokens of the new part only: the template's end of turn (less what the sampled stop token already wrote)
and the new messages up to the next generation prompt.

Plain functions of a tokenizer (transformers' ``apply_chat_template``): no I/O, no actor.
"""
from __future__ import annotations

_PROBE = "Zq7xv probe reply"  # an assistant reply no template rewrites


class TemplateError(ValueError):
    """The template refused the messages (a jinja ``raise_exception``, a role it does not know)."""


class ChatTemplate:
    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{type(tokenizer).__name__} has no chat template: /v1/chat/completions needs one "
                             "(use /v1/completions with a prompt)")
        self.tok = tokenizer
        self.end_of_turn = self._end_of_turn()

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        try:
            text = self.tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
        except Exception as exc:  # jinja2's TemplateError and friends: the messages' fault
            raise TemplateError(f"the model's chat template refused the messages: {type(exc).__name__}: {exc}") \
                from None
        if not isinstance(text, str):
            raise TemplateError(f"the chat template rendered {type(text).__name__}, not text")
        return text

    def encode(self, text: str) -> list[int]:
        """Text as the template's tokenisation (apply_chat_template(tokenize=True) adds no special tokens)."""
        return [int(t) for t in self.tok.encode(text, add_special_tokens=False)]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.encode(self.render(messages, True))

    def _end_of_turn(self) -> str | None:
        """What the template writes after an assistant reply's content ("<|im_end|>\\n" for ChatML); None
        where a reply is not rendered as generation prompt + content + something (no turn then extends)."""
        user = [{"role": "user", "content": "hi"}]
        try:
            asked = self.render(user, True)
            answered = self.render(user + [{"role": "assistant", "content": _PROBE}], False)
        except TemplateError:
            return None
        head = asked + _PROBE
        return answered[len(head):] if answered.startswith(head) else None

    def continuation(self, history: list[dict], reply: str, sampled: list[int], stopped: bool,
                     messages: list[dict]) -> list[int] | None:
        """The tokens that follow the sampled ids when ``messages`` continue ``history`` + the assistant
        ``reply`` (as rendered: generation prompt + reply + end of turn); None where they do not (a new
        segment then starts). ``stopped``: the reply ended on a stop token, which may have written the
        start of the end of turn (ChatML's <|im_end|>), so that part is not added again."""
        k = len(history)
        if self.end_of_turn is None or len(messages) <= k + 1 or messages[:k] != history:
            return None
        if messages[k] != {"role": "assistant", "content": reply}:
            return None
        said = self.render(history + [messages[k]], False)
        if said != self.render(history, True) + reply + self.end_of_turn:
            return None  # the template rewrites this reply (drops reasoning, strips spaces): not a continuation
        full = self.render(messages, True)
        if not full.startswith(said):
            return None
        eot = self.end_of_turn
        if stopped and sampled:
            stop = self.tok.decode(sampled[-1:], skip_special_tokens=False)
            if stop and eot.startswith(stop):
                eot = eot[len(stop):]
        return self.encode(eot + full[len(said):])
