"""The generator's OpenAI-compatible endpoint: an aiohttp server in the generator's process and loop.

    POST /s/<sid>/v1/chat/completions     POST /s/<sid>/v1/completions     GET /s/<sid>/v1/models

Each open session (sessions.py) has its own URL prefix and bearer token (``Authorization: Bearer <key>``,
compared in constant time), so the plain ``openai`` client works with ``base_url``/``api_key`` and no
agent can write into another's trajectory. A turn is one ``generate(rid, prompt_ids, sampling)`` of the
generator's backend (torch, SGLang, sim alike), bounded by the session's deadline and the generator's
generate timeout. Every refusal is OpenAI's error JSON (``{"error": {message, type, param, code}}``): 400
for a bad request naming the field, 401 for a wrong key, 404 for an unknown session; nothing a client
sends stops the generator. ``stream: true`` is answered as server-sent events (the whole turn in one
chunk once it is generated). The same body sent again (a retry, or a concurrent copy) gets the first
answer and is recorded once.
"""
from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
import secrets
import time
from typing import Awaitable, Callable
from urllib.parse import quote

from aiohttp import web

from actors.generator.sessions import RequestError, Session, SessionOver, request_key
from policies.infer.sampling import Sample

log = logging.getLogger("actors.generator.openai_api")
Generate = Callable[[str, list[int], dict], Awaitable[Sample]]
MAX_BODY_BYTES = 64 * 1024 * 1024  # a long agent history, as JSON


def error(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
          code: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": type, "param": param, "code": code}},
                             status=status)


class OpenAIServer:
    """Open sessions and the HTTP server that serves them (the generator opens and closes sessions)."""

    def __init__(self, generate: Generate, *, host: str, port: int = 0, bind: str | None = None,
                 turn_timeout: float = 3600.0, model: str = "policy", clock=time.monotonic):
        self.generate, self.host, self.port, self.bind = generate, host, port, bind or host
        self.turn_timeout, self.model, self.clock = turn_timeout, model, clock
        self.sessions: dict[str, Session] = {}
        self._keys: dict[str, str] = {}
        self.opened: dict[str, dict] = {}  # sid -> the OPEN_SESSION body that opened it
        self._turns: dict[str, set[asyncio.Task]] = {}  # sid -> generations in flight (cancelled on close)
        self._rids = itertools.count()
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/s/{sid}/v1/chat/completions", self._chat)
        app.router.add_post("/s/{sid}/v1/completions", self._completion)
        app.router.add_get("/s/{sid}/v1/models", self._models)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.bind, self.port, shutdown_timeout=2.0)  # turns are cancelled first
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(f"actors.generator.openai_port: cannot listen on {self.bind}:{self.port} ({exc}); "
                          "0 picks a free port") from None
        self._runner = runner
        self.port = site._server.sockets[0].getsockname()[1]
        log.info("OpenAI endpoint on http://%s:%d/s/<session>/v1", self.host, self.port)

    async def close(self) -> None:
        for tasks in self._turns.values():
            for t in tasks:
                t.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------ sessions
    def base_url(self, sid: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/s/{quote(sid, safe='')}/v1"

    def open(self, session: Session, body: dict | None = None) -> dict:
        """Register ``session`` (opened by ``body``); the reply of OPEN_SESSION."""
        sid = session.sid
        if sid in self.sessions:
            raise ValueError(f"session {sid!r} is already open on this generator")
        self._sweep()
        self.sessions[sid] = session
        self._keys[sid] = secrets.token_urlsafe(32)
        self.opened[sid] = body or {}
        self._turns[sid] = set()
        return self.reply(sid)

    def reply(self, sid: str) -> dict:
        return {"base_url": self.base_url(sid), "api_key": self._keys[sid]}

    def close_session(self, sid: str) -> dict:
        session = self.sessions.pop(sid, None)
        if session is None:
            raise KeyError(sid)
        self._keys.pop(sid, None)
        self.opened.pop(sid, None)
        for t in self._turns.pop(sid, ()):
            t.cancel()
        return session.result()

    def _sweep(self, grace: float = 300.0) -> None:
        """Forget sessions nobody closed (their rollout worker died) well past their deadline."""
        now = self.clock()
        for sid in [s for s, x in self.sessions.items() if now > x.deadline + grace]:
            log.warning("session %s was never closed; forgotten %.0f s after its deadline", sid, grace)
            self.close_session(sid)

    # ------------------------------------------------------------------ HTTP
    async def _models(self, request: web.Request) -> web.Response:
        session, refusal = self._session(request)
        if refusal is not None:
            return refusal
        return web.json_response({"object": "list", "data": [
            {"id": session.model, "object": "model", "created": 0, "owned_by": "boba-actors"}]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._turn(request, "chat")

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        return await self._turn(request, "completion")

    def _session(self, request: web.Request) -> tuple[Session | None, web.Response | None]:
        sid = request.match_info["sid"]
        session = self.sessions.get(sid)
        if session is None:
            return None, error(404, f"no open session {sid!r} on this generator (closed, expired or never opened)",
                               code="session_not_found")
        auth = request.headers.get("Authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), self._keys[sid].encode()):
            return None, error(401, "invalid API key for this session (Authorization: Bearer <the api_key "
                                    "OPEN_SESSION returned>)", type="authentication_error", code="invalid_api_key")
        return session, None

    async def _turn(self, request: web.Request, kind: str) -> web.StreamResponse:
        session, refusal = self._session(request)
        if refusal is not None:
            return refusal
        try:
            body = json.loads(await request.read())
        except ValueError as exc:
            return error(400, f"the request body is not JSON: {exc}")
        except web.HTTPException as exc:  # too large
            return error(exc.status, f"the request body was refused: {exc.reason}")
        if not isinstance(body, dict):
            return error(400, f"the request body must be a JSON object, got {type(body).__name__}")
        stream = body.get("stream", False)
        if stream not in (None, True, False):
            return error(400, f"stream: expected true or false, got {stream!r}", param="stream")
        if not isinstance(body.get("stream_options") or {}, dict):
            return error(400, "stream_options: expected an object like {\"include_usage\": true}",
                         param="stream_options")
        try:
            answer = await self._answer(session, kind, body)
        except RequestError as exc:
            return error(400, str(exc), param=exc.param, code=exc.code)
        except asyncio.CancelledError:
            if session.sid not in self.sessions:  # closed under it
                return error(400, f"session {session.sid} was closed while this turn ran", code="session_closed")
            raise
        except Exception as exc:
            log.exception("session %s: a %s turn failed", session.sid, kind)
            return error(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error")
        if stream:
            return await _stream(request, answer, body)
        return web.json_response(answer)

    async def _answer(self, session: Session, kind: str, body: dict) -> dict:
        key = request_key(kind, {k: v for k, v in body.items() if k != "stream"})
        while True:
            if key in session.answers:
                return session.answers[key]
            first = session.pending.get(key)
            if first is None:
                break
            await asyncio.shield(first)  # a concurrent copy: the first one's answer, or our own try if it failed
        plan = session.plan(kind, body, self.clock(), key)
        done = asyncio.get_running_loop().create_future()
        session.pending[key] = done
        rid = f"{session.sid}/{next(self._rids)}"
        task = asyncio.ensure_future(self.generate(rid, plan.prompt_ids, plan.sampling))
        turns = self._turns.get(session.sid, set())
        turns.add(task)
        try:
            timeout = min(self.turn_timeout, session.deadline - self.clock())
            try:
                sample = await asyncio.wait_for(task, max(0.0, timeout))
            except TimeoutError:
                if self.clock() >= session.deadline:
                    session.expire()
                    raise SessionOver("deadline", f"session {session.sid}: its deadline passed during this turn; "
                                                  "the turn is not recorded") from None
                raise RuntimeError(f"no token within the generator's generate timeout ({self.turn_timeout:g} s)") \
                    from None
            except ValueError as exc:  # the backend refused the prompt (longer than the model's context)
                raise RequestError("messages" if kind == "chat" else "prompt", str(exc)) from None
            answer = session.record(plan, sample, int(time.time()))
            plan = None
            return answer
        finally:
            turns.discard(task)
            if plan is not None:
                session.release(plan)
            session.pending.pop(key, None)
            done.set_result(None)


async def _stream(request: web.Request, answer: dict, body: dict) -> web.StreamResponse:
    """The answer as server-sent events: one chunk with the text, one with the finish reason (and usage
    when stream_options.include_usage), then [DONE]."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    choice = answer["choices"][0]
    chat = answer["object"] == "chat.completion"
    base = {"id": answer["id"], "created": answer["created"], "model": answer["model"],
            "object": "chat.completion.chunk" if chat else "text_completion"}
    if chat:
        first = {"index": 0, "delta": {"role": "assistant", "content": choice["message"]["content"]},
                 "logprobs": choice["logprobs"], "finish_reason": None}
        last = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": choice["finish_reason"]}
    else:
        first = {"index": 0, "text": choice["text"], "logprobs": choice["logprobs"], "finish_reason": None}
        last = {"index": 0, "text": "", "logprobs": None, "finish_reason": choice["finish_reason"]}
    events = [{**base, "choices": [first]}, {**base, "choices": [last]}]
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append({**base, "choices": [], "usage": answer["usage"]})
    for e in events:
        await resp.write(f"data: {json.dumps(e)}\n\n".encode())
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp
