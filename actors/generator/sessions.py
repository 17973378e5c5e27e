"""Per-rollout sessions of the OpenAI-compatible endpoint: requests in, exactly what was sampled out.

A session is one trajectory of an agent (one of the G samples of a prompt). Each request it makes is a
turn: ``plan`` checks the request (a bad one is a RequestError naming the field), finds the segment it
continues and builds its prompt ids (chat_template.py says how, without re-tokenising what was sampled),
and gives it at most the trajectory's token budget that is left; the server generates; ``record`` adds
the turn's tokens to its segment and returns the OpenAI response. A turn whose prompt does not continue
a segment (the agent rewrote or cut its history) starts a new one; every segment becomes one training
sequence whose loss mask is True exactly on sampled tokens, with their behaviour logprobs and versions.

The same request body again (the openai client retries by default) is answered with the first answer and
recorded once. Plain logic (no I/O, no clock: callers pass ``now``), so it is tested without a server.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

from actors.generator.chat_template import ChatTemplate, TemplateError
from policies.infer.sampling import Sample

ROLES = ("system", "developer", "user", "assistant", "tool")
MESSAGE_KEYS = ("role", "content", "name", "tool_call_id")  # what a template may use; the rest is dropped


class RequestError(ValueError):
    """A request the endpoint refuses (HTTP 400), naming the field (OpenAI's ``param``)."""

    def __init__(self, param: str | None, message: str, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class SessionOver(RequestError):
    """The trajectory has ended (token budget, deadline, max turns, closed): no further turn."""

    def __init__(self, reason: str, message: str):
        super().__init__(None, message, code=f"session_{reason}")
        self.reason = reason


def request_key(kind: str, body: dict) -> str:
    """The same request sent again (a retry) has the same key."""
    return hashlib.sha256(json.dumps([kind, body], sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Segment:
    """One training sequence: prompt and sampled tokens in order; the view its last turn left for the
    next turn to continue (chat: the messages and the reply; completions: the prompt text + reply)."""
    input_ids: list[int] = field(default_factory=list)
    loss_mask: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    kind: str = "chat"
    history: list[dict] | None = None   # chat: the last turn's messages
    text: str | None = None            # completions: the last prompt's text + its reply
    reply: str = ""
    sampled: list[int] = field(default_factory=list)
    stopped: bool = False

    def extend(self, ids: list[int], sample: Sample | None) -> None:
        self.input_ids += ids
        self.loss_mask += [False] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.versions += [-1] * len(ids)
        if sample is not None:
            self.input_ids += sample.output_ids
            self.loss_mask += [True] * len(sample.output_ids)
            self.logprobs += [float(x) for x in sample.logprobs]
            self.versions += [int(v) for v in sample.versions]

    def as_dict(self) -> dict:
        return {"input_ids": self.input_ids, "loss_mask": self.loss_mask, "logprobs": self.logprobs,
                "versions": self.versions}


@dataclass
class Plan:
    """A checked turn, ready to generate: ``prompt_ids`` = ``segment``'s ids + ``new_ids``."""
    key: str
    kind: str
    prompt_ids: list[int]
    new_ids: list[int]
    segment: Segment | None  # the one it continues; None: a new segment
    max_new: int
    budget_cut: bool         # the budget, not the request or the session's per-turn limit, set max_new
    sampling: dict           # for Backend.generate_group
    model: str
    logprobs: bool
    view: object             # chat: the messages; completions: the prompt text (None for token ids)


class Session:
    def __init__(self, sid: str, template: ChatTemplate | None, tokenizer, *, sampling: dict, max_tokens: int,
                 deadline: float, max_turns: int | None = None, model: str = "policy"):
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens!r}: expected the trajectory's token budget, an int >= 1")
        if max_turns is not None and (isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1):
            raise ValueError(f"max_turns={max_turns!r}: expected an int >= 1 or null")
        if not isinstance(sampling, dict):
            raise ValueError(f"sampling={sampling!r}: expected a map (GENERATE's sampling keys)")
        self.sid, self.template, self.tok = sid, template, tokenizer
        self.sampling, self.max_tokens, self.deadline, self.max_turns = dict(sampling), max_tokens, deadline, max_turns
        per_turn = sampling.get("max_new_tokens") or max_tokens
        if isinstance(per_turn, bool) or not isinstance(per_turn, int) or per_turn < 1:
            raise ValueError(f"sampling.max_new_tokens={per_turn!r}: expected a turn's token limit, an int >= 1")
        self.per_turn = per_turn
        self.model = model
        self.segments: list[Segment] = []
        self.turns = 0
        self.completion_tokens = 0
        self.reserved = 0          # tokens promised to turns in flight
        self.in_flight = 0
        self.finish: str | None = None
        self.last_text: str | None = None
        self.answers: dict[str, dict] = {}   # request key -> the response (retries get it again)
        self.pending: dict[str, object] = {}  # request key -> the server's handle of a turn in flight

    # ------------------------------------------------------------------ turns
    def plan(self, kind: str, body: dict, now: float, key: str | None = None) -> Plan:
        if not isinstance(body, dict):
            raise RequestError(None, f"the request body must be a JSON object, got {type(body).__name__}")
        key = key or request_key(kind, body)
        self._check_open(now)
        limit = _opt_int(body, "max_completion_tokens") or _opt_int(body, "max_tokens")
        _common_checks(body, self.sampling)
        if kind == "chat":
            messages = _messages(body.get("messages"))
            segment, new_ids = self._continue_chat(messages)
            view: object = messages
        elif kind == "completion":
            segment, new_ids, view = self._continue_completion(body.get("prompt"))
        else:
            raise ValueError(f"kind={kind!r}: chat or completion")
        left = self.max_tokens - self.completion_tokens - self.reserved
        want = min(limit or self.per_turn, self.per_turn)
        max_new = min(want, left)
        prompt = (segment.input_ids if segment else []) + new_ids
        if not prompt:
            raise RequestError("prompt", "the prompt is empty")
        self.reserved += max_new
        self.in_flight += 1
        return Plan(key, kind, prompt, new_ids, segment, max_new, max_new < want,
                    {**self.sampling, "max_new_tokens": max_new}, str(body.get("model") or self.model),
                    bool(body.get("logprobs")), view)

    def release(self, plan: Plan) -> None:
        """A turn that generated nothing (failed, cancelled): its budget is free again, nothing recorded."""
        self.reserved -= plan.max_new
        self.in_flight -= 1

    def record(self, plan: Plan, sample: Sample, created: int) -> dict:
        """Add the turn's tokens to its segment and answer it (the same answer to a retry of it)."""
        self.release(plan)
        if len(sample.output_ids) > plan.max_new:
            raise RuntimeError(f"the backend sampled {len(sample.output_ids)} tokens, more than max_new_tokens="
                               f"{plan.max_new}")
        seg = plan.segment
        if seg is None or seg.input_ids != plan.prompt_ids[:len(seg.input_ids)] or seg not in self.segments:
            seg = Segment(kind=plan.kind)
            self.segments.append(seg)
            seg.extend(plan.prompt_ids, sample)
        else:
            seg.extend(plan.new_ids, sample)
        text = self.tok.decode(sample.output_ids, skip_special_tokens=True)
        stopped = sample.finish_reason == "stop"
        seg.kind, seg.reply, seg.sampled, seg.stopped = plan.kind, text, list(sample.output_ids), stopped
        if plan.kind == "chat":
            seg.history, seg.text = list(plan.view), None
        else:
            seg.history, seg.text = None, None if plan.view is None else plan.view + text
        self.turns += 1
        self.completion_tokens += len(sample.output_ids)
        self.last_text = text
        finish = "stop" if stopped else "length"
        self.finish = "budget" if plan.budget_cut and not stopped else finish
        answer = _response(self, plan, sample, text, finish, created)
        self.answers[plan.key] = answer
        return answer

    def expire(self) -> None:
        self.finish = "deadline"

    def result(self) -> dict:
        """CLOSE_SESSION's reply (AGENTIC_CONTRACT.md)."""
        return {"segments": [s.as_dict() for s in self.segments], "turns": self.turns,
                "completion_tokens": self.completion_tokens, "last_text": self.last_text,
                "finish": self.finish or "stop"}

    # ------------------------------------------------------------------ internals
    def _check_open(self, now: float) -> None:
        if self.finish == "deadline" or now >= self.deadline:
            self.finish = "deadline"
            raise SessionOver("deadline", f"session {self.sid}: its deadline has passed; no further turn")
        if self.completion_tokens + self.reserved >= self.max_tokens:
            raise SessionOver("budget", f"session {self.sid}: its token budget ({self.max_tokens} completion "
                                        "tokens over the trajectory) is spent; no further turn")
        if self.max_turns is not None and self.turns + self.in_flight >= self.max_turns:
            raise SessionOver("max_turns", f"session {self.sid}: max_turns={self.max_turns} reached; no further turn")

    def _continue_chat(self, messages: list[dict]) -> tuple[Segment | None, list[int]]:
        if self.template is None:
            raise RequestError("messages", "this model's tokenizer has no chat template: use /v1/completions")
        try:
            for seg in reversed(self.segments):  # the newest first: an agent goes on from its last turn
                if seg.kind == "chat" and seg.history is not None:
                    tail = self.template.continuation(seg.history, seg.reply, seg.sampled, seg.stopped, messages)
                    if tail is not None:
                        return seg, tail
            return None, self.template.prompt_ids(messages)
        except TemplateError as exc:
            raise RequestError("messages", str(exc)) from None

    def _continue_completion(self, prompt) -> tuple[Segment | None, list[int], str | None]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt", "prompt is an empty string")
            for seg in reversed(self.segments):
                if seg.kind == "completion" and seg.text is not None and prompt.startswith(seg.text):
                    return seg, self.tok.encode(prompt[len(seg.text):], add_special_tokens=False), prompt
            return None, [int(t) for t in self.tok.encode(prompt, add_special_tokens=False)], prompt
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                        and 0 <= t < len(self.tok) for t in prompt):
            for seg in reversed(self.segments):
                n = len(seg.input_ids)
                if seg.kind == "completion" and prompt[:n] == seg.input_ids:
                    return seg, list(prompt[n:]), None
            return None, list(prompt), None
        raise RequestError("prompt", "expected a non-empty string or a non-empty list of token ids in "
                                     f"[0, {len(self.tok)}) (one prompt: this endpoint answers n=1)")


# ---------------------------------------------------------------------- request fields
def _opt_int(body: dict, name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise RequestError(name, f"{name}: expected an int >= 1, got {v!r}")
    return v


def _common_checks(body: dict, sampling: dict) -> None:
    """Fields this endpoint cannot honour are refused, not ignored: the learner's recompute assumes the
    session's sampling, and a stop string or a penalty would change what was sampled."""
    n = body.get("n")
    if n not in (None, 1):
        raise RequestError("n", f"n: expected 1 (each session is one sample; open G sessions for G), got {n!r}")
    best_of = body.get("best_of")
    if best_of not in (None, 1):
        raise RequestError("best_of", f"best_of: expected 1, got {best_of!r}")
    for name, default in (("temperature", 1.0), ("top_p", 1.0)):
        v, have = body.get(name), sampling.get(name, default)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise RequestError(name, f"{name}: expected a number, got {v!r}")
        if abs(v - (default if have is None else have)) > 1e-9:
            raise RequestError(name, f"{name}: this session samples at {have} (the rollout's sampling, which the "
                                     f"learner's recompute assumes); leave it out or send {have}, got {v!r}")
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise RequestError(name, f"{name}: not supported (it changes what is sampled); leave it out")
    for name in ("stop", "logit_bias", "tools", "functions", "suffix"):
        if body.get(name) not in (None, [], {}, ""):
            hint = " (describe the tool in the messages and parse the call from the reply)" \
                if name in ("tools", "functions") else ""
            raise RequestError(name, f"{name}: not supported by this endpoint{hint}; leave it out")
    if body.get("echo"):
        raise RequestError("echo", "echo: not supported; leave it out")
    top = body.get("top_logprobs")
    if top not in (None, 0):
        raise RequestError("top_logprobs", "top_logprobs: only the sampled token's logprob is recorded "
                                           f"(send logprobs: true, no top_logprobs), got {top!r}")
    lp = body.get("logprobs")
    if lp not in (None, True, False, 0):
        raise RequestError("logprobs", f"logprobs: expected true or false, got {lp!r}")
    fmt = body.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise RequestError("response_format", "response_format: only {'type': 'text'} is supported")


def _messages(raw) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise RequestError("messages", "messages: expected a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}]", f"messages[{i}]: expected an object, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(f"messages[{i}].role", f"messages[{i}].role: expected one of {list(ROLES)}, "
                                                      f"got {role!r}")
        if m.get("tool_calls"):
            raise RequestError(f"messages[{i}].tool_calls", f"messages[{i}].tool_calls: not supported; "
                                                            "put the call in the content")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, p in enumerate(content):
                if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                    raise RequestError(f"messages[{i}].content[{j}]", f"messages[{i}].content[{j}]: only "
                                       "{'type': 'text', 'text': str} parts are supported")
                parts.append(p["text"])
            content = "".join(parts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content", f"messages[{i}].content: expected a string, got "
                                                         f"{type(content).__name__}")
        msg = {"role": role, "content": content}
        for k in MESSAGE_KEYS[2:]:
            if m.get(k) is not None:
                msg[k] = m[k]
        out.append(msg)
    return out


# ---------------------------------------------------------------------- responses
def _response(session: Session, plan: Plan, sample: Sample, text: str, finish: str, created: int) -> dict:
    usage = {"prompt_tokens": len(plan.prompt_ids), "completion_tokens": len(sample.output_ids),
             "total_tokens": len(plan.prompt_ids) + len(sample.output_ids)}
    n = session.turns
    tokens = [session.tok.decode([t], skip_special_tokens=False) for t in sample.output_ids] if plan.logprobs else []
    if plan.kind == "chat":
        logprobs = None
        if plan.logprobs:
            logprobs = {"content": [{"token": t, "logprob": float(lp), "bytes": list(t.encode()), "top_logprobs": []}
                                    for t, lp in zip(tokens, sample.logprobs)], "refusal": None}
        return {"id": f"chatcmpl-{session.sid}-{n}", "object": "chat.completion", "created": created,
                "model": plan.model, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                  "finish_reason": finish, "logprobs": logprobs}],
                "usage": usage}
    logprobs = None
    if plan.logprobs:
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        logprobs = {"tokens": tokens, "token_logprobs": [float(x) for x in sample.logprobs], "top_logprobs": None,
                    "text_offset": offsets}
    return {"id": f"cmpl-{session.sid}-{n}", "object": "text_completion", "created": created, "model": plan.model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}], "usage": usage}
