"""The chat prompt the model sees, and the tokens that end its answer.

Pure functions of a tokenizer: the sampler, the evaluator and SFT build prompts the same way.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DIRECTIVE = "Please reason step by step, and enclose your final answer in \\boxed{}."


def _ids(encoded: Any) -> list[int]:
    """Token ids from whatever `apply_chat_template(tokenize=True)` returned (list, BatchEncoding, dict)."""
    if isinstance(encoded, Mapping) or hasattr(encoded, "input_ids"):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):      # a batch of one
        if len(encoded) != 1:
            raise ValueError(f"expected one tokenized prompt, got a batch of {len(encoded)}")
        encoded = encoded[0]
    return [int(t) for t in encoded]


def build_prompt(tokenizer: Any, problem_prompt: str, directive: str, force_newline: bool = False, *,
                 system_prompt: str | None = None) -> list[int]:
    """Token ids of the chat prompt "{problem} {directive}" ready for the assistant's answer.

    With `force_newline` the assistant turn starts with "\\n" (the release's "force the response to begin
    with a newline" option): the newline is appended as its own token(s), as if the model had sampled it.
    With `system_prompt` a system turn comes first (the template's own default system turn, if any, gives way).
    """
    content = f"{problem_prompt} {directive}" if directive else problem_prompt
    messages = [{"role": "user", "content": content}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    ids = _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    if force_newline:
        ids += list(tokenizer.encode("\n", add_special_tokens=False))
    return ids


def chat_sft_ids(tokenizer: Any, messages: list[dict], end_id: int) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation through the chat template, and the loss mask: True on each assistant
    turn's text and its end-of-turn token `end_id` (what the policy samples), False on everything else
    (system and user turns, tool outputs, the template's role headers).

    Each assistant turn is found as the template's rendering of the turns up to it minus the rendering of
    those before it with the generation prompt; a template that does not render a conversation as a
    prefix of its continuation (one that rewrites earlier turns) is a ValueError."""
    ids: list[int] = []
    mask: list[bool] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _ids(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=True))
        full = _ids(tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False, tokenize=True))
        if prefix[:len(ids)] != ids or full[:len(prefix)] != prefix:
            raise ValueError(f"the chat template renders messages[:{i}] differently once turn {i} follows: "
                             "cannot mask the assistant turns")
        turn = full[len(prefix):]
        if end_id in turn:   # the end-of-turn token ends the sampled text; what the template adds after it does not
            turn = turn[:turn.index(end_id) + 1]
        mask += [False] * (len(prefix) - len(ids)) + [True] * len(turn)
        ids = prefix + turn
    return ids, mask


def stop_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)
