"""A small stand-in for an SGLang 0.5.23 HTTP server, for CI machines without a GPU.

It speaks the real protocol (paths, bodies, replies and failure modes read from sglang 0.5.23's
http_server.py, io_struct.py and tokenizer/scheduler code): 503 on /health while starting,
/generate batches with n samples at index i*n+j, output_token_logprobs [[logprob, id, text]],
finish_reason {type: stop|length|abort}, weight_version and weight_versions spans in meta_info;
pause_generation abort|retract|in_place (new requests wait while paused); an update outside a pause
waits for the requests in flight and holds new ones meanwhile (the writer-preferring
model_update_lock), aborting them first with abort_all_requests; /flush_cache answers
400 (plain text) while requests run; update_weights_from_distributed/tensor are refused outside
begin/end_weight_update; control bodies ignore unknown fields as SGLang's pydantic schema does.

"Generation" is a deterministic rule (fake_token below) so tests can predict every token: the
next token hashes the weight version, the last tokens of the context and its length, so a
request resumed with prompt + partial output continues exactly as an uninterrupted one would
under the same weights. Run it alone with `python tests/fake_sglang.py --model-path M --port P`.

Weights travel as with the real server: /init_weights_update_group joins the trainer's
torch.distributed TCP rendezvous with SGLang's own init_custom_process_group (copied below)
as rank rank_offset + tp_rank, and /update_weights_from_distributed receives one broadcast from
rank 0 per tensor in list order, each TP rank in a process of its own as SGLang's schedulers
(the tensors are kept in `weights`; `--dump-weights DIR` also writes them at
end_weight_update). Those processes start with the first group, so the server itself still
starts in a fraction of a second.

LoRA (--enable-lora --max-lora-rank --lora-target-modules; /load_lora_adapter, /unload_lora_adapter,
/generate's lora_path, /update_weight_version) lives in tests/fake_sglang_lora.py: a request with an
adapter generates from base + adapter, the effective weights it computes from the PEFT files.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import struct
import sys
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import Any

VERSION = "0.5.23"
DTYPES = {"float64", "float32", "bfloat16", "float16", "float8_e4m3fn", "float8_e5m2",
          "int64", "int32", "int16", "int8", "uint8", "bool"}
SAMPLING_FIELDS = (  # SGLang's SamplingParams JSON contract rejects any other key
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k",
    "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens",
    "n", "json_schema", "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens",
    "spaces_between_special_tokens", "no_stop_trim", "stream_interval", "logit_bias",
    "sampling_seed", "custom_params", "beam_width", "watermark", "choice")
NOT_IN_SESSION = ("{op} must run between begin_weight_update() and end_weight_update()")
FLUSH_BUSY = ("Weights were updated, but the cache was not flushed because requests are still "
              "running or queued. Retract or finish them, then call /flush_cache.")
FLUSH_OK_TEXT = ("Cache flushed.\nPlease check backend logs for more details. (When there are "
                 "running or waiting requests, the operation will not be performed.)\n")
# route -> allowed methods (a subset of 0.5.23's routes, same paths and methods)
ROUTES = {
    "/health": ("GET",), "/health_generate": ("GET",), "/model_info": ("GET",),
    "/get_model_info": ("GET",), "/generate": ("POST", "PUT"), "/flush_cache": ("GET", "POST"),
    "/abort_request": ("POST",), "/pause_generation": ("POST",),
    "/continue_generation": ("POST",), "/init_weights_update_group": ("POST",),
    "/destroy_weights_update_group": ("POST",), "/begin_weight_update": ("POST",),
    "/end_weight_update": ("POST",), "/update_weights_from_distributed": ("POST",),
    "/update_weights_from_tensor": ("POST",), "/update_weights_from_disk": ("POST",),
    "/update_weight_version": ("POST",), "/load_lora_adapter": ("POST",), "/unload_lora_adapter": ("POST",),
}
# introspection for tests; not SGLang's
FAKE_ROUTES = {"/_fake/calls": ("GET",), "/_fake/launch": ("GET",), "/_fake/loras": ("GET",)}
# what /_fake/launch reports of the server's environment (the launcher's placement and NCCL settings)
LAUNCH_ENV = ("CUDA_VISIBLE_DEVICES", "NCCL_CUMEM_ENABLE", "TORCH_NCCL_ASYNC_ERROR_HANDLING")


def auth_allowed(path: str, authorization: str | None, api_key: str | None) -> bool:
    """SGLang 0.5.23's decision for its normal endpoints (sglang.srt.utils.auth.decide_request_auth):
    health, readiness and metrics always; with --api-key every other path needs `Bearer <key>`."""
    if not api_key or path.startswith(("/health", "/ready", "/metrics", "/_fake/")):
        return True
    scheme, _, token = (authorization or "").partition(" ")
    return bool(token) and scheme.lower() == "bearer" and hmac.compare_digest(token, api_key)


def fake_token(context: list[int], version: str, vocab_size: int, salt: int = 0) -> int:
    """The next token: a hash of the weights (version), the context's length and last 8 tokens,
    and for a sample's first token its index j among the n samples (so samples differ)."""
    return _hash(context, version, salt) % vocab_size


def fake_logprob(context: list[int], version: str, salt: int = 0) -> float:
    """Behaviour logprob of fake_token(context, ...): a value in [-8, -0.01]."""
    return -0.01 - (_hash(context, version, salt + 7919) % 800) / 100.0


def _hash(context: list[int], version: str, salt: int) -> int:
    tail = context[-8:]
    data = struct.pack(f"<qq{len(tail)}q", len(context), salt, *tail) + version.encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class BadRequest(Exception):
    def __init__(self, payload: Any, status: int = 400):
        self.payload, self.status = payload, status


def _validation_error(msg: str) -> BadRequest:
    # FastAPI's RequestValidationError as SGLang re-shapes it (400 instead of 422)
    return BadRequest({"object": "error", "message": msg, "type": "Bad Request",
                       "param": None, "code": 400})


def _fields(body: Any, spec: dict[str, tuple[type | tuple, bool]]) -> dict:
    """Check a control body like SGLang's pydantic schema: required fields and types are
    enforced, unknown fields ignored."""
    if not isinstance(body, dict):
        raise _validation_error(f"body must be an object, got {type(body).__name__}")
    for name, (types, required) in spec.items():
        if name not in body:
            if required:
                raise _validation_error(f"[{{'type': 'missing', 'loc': ('body', '{name}'), "
                                        f"'msg': 'Field required'}}]")
            continue
        v = body[name]
        if v is not None and (not isinstance(v, types) or (isinstance(v, bool)
                                                            and bool not in _tuple(types))):
            raise _validation_error(f"[{{'loc': ('body', '{name}'), 'msg': 'Input should be "
                                    f"{_tuple(types)[0].__name__}', 'input': {v!r}}}]")
    return body


def _tuple(t):
    return t if isinstance(t, tuple) else (t,)


@dataclass
class Req:
    rid: str
    prompt: list[int]
    salt: int
    params: dict
    started: float = field(default_factory=time.monotonic)
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    events: list[tuple[str, int]] = field(default_factory=list)  # (old version, tokens so far)
    abort_message: str | None = None
    cached_tokens: int = 0
    lora_id: str | None = None  # the adapter it was admitted with (None: the base)
    key: str | None = None  # what its tokens hash instead of the weight version (its adapter's weights)


class FakeSGLang:
    """The fake server; run it in the test's event loop (start/stop) or as a process (main)."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, model_path: str = "fake-model",
                 tp_size: int = 1, weight_version: str = "default", startup_delay: float = 0.0,
                 token_delay: float = 0.002, vocab_size: int = 32000, update_delay: float = 0.0,
                 group_timeout: float = 30.0, dump_weights: str | None = None, api_key: str | None = None,
                 dtype: str | None = None, enable_lora: bool = False, max_lora_rank: int | None = None,
                 lora_target_modules: list[str] | None = None):
        self.host, self.port, self.model_path, self.tp_size = host, port, model_path, tp_size
        self.api_key, self.dtype = api_key, dtype  # --api-key, --dtype
        self.weight_version = weight_version
        self.startup_delay, self.token_delay = startup_delay, token_delay
        self.vocab_size = vocab_size
        # real SGLang uses torch's default (30 min); the fake waits less so a broken test ends
        self.update_delay, self.group_timeout = update_delay, group_timeout
        self.weights: dict = {}  # name -> tensor received over the weight-update group
        self.dump_weights = dump_weights  # fake: write them here at end_weight_update
        self.calls: list[dict] = []  # every request but /health: method, path, body, status, reply
        self.received: list[dict] = []  # buckets of update_weights_from_distributed
        self.groups: dict[str, dict] = {}
        self.session_open = False
        self.update_in_flight = 0  # update_weights_from_distributed requests being served
        self.pause_mode: str | None = None
        self.writers_waiting = 0  # updates waiting for model_update_lock (new requests wait behind them)
        self.running: dict[str, Req] = {}
        self.reply_hook = None  # tests may set fn(path, payload) -> payload to corrupt replies
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        self._cache: set[tuple[int, ...]] = set()
        self._rid_seq = 0
        self._server: asyncio.base_events.Server | None = None
        self._started = time.monotonic()
        self._conns: dict[asyncio.StreamWriter, asyncio.Task] = {}
        self._workers: list[_TPWorker] = []  # the TP ranks' processes (started by the first init)
        from fake_sglang_lora import FakeLoras
        self.lora = FakeLoras(self, enabled=enable_lora, max_rank=max_lora_rank, target_modules=lora_target_modules)

    # ---- lifecycle

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> str:
        self._started = time.monotonic()
        self._server = await asyncio.start_server(self._serve, self.host, self.port,
                                                  limit=1 << 24)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.url

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for w, task in list(self._conns.items()):
                w.close()
                task.cancel()
            await asyncio.gather(*self._conns.values(), return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        for w in self._workers:
            await asyncio.to_thread(w.close)
        self._workers = []

    # ---- HTTP/1.1 on asyncio streams (keep-alive, Content-Length bodies)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns[writer] = asyncio.current_task()
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, target, _ = line.decode("latin-1").split(" ", 2)
                headers = {}
                while (h := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    k, _, v = h.decode("latin-1").partition(":")
                    headers[k.strip().lower()] = v.strip()
                n = int(headers.get("content-length", "0"))
                raw = await reader.readexactly(n) if n else b""
                url = urllib.parse.urlsplit(target)
                query = dict(urllib.parse.parse_qsl(url.query))
                work = asyncio.ensure_future(self._dispatch(method, url.path, query, raw,
                                                            headers.get("authorization")))
                # a client that hangs up mid-request makes SGLang abort it ("type 3" abort)
                eof = asyncio.ensure_future(reader.read(1))
                done, _ = await asyncio.wait({work, eof}, return_when=asyncio.FIRST_COMPLETED)
                if work not in done:
                    work.cancel()
                    await asyncio.gather(work, return_exceptions=True)
                    return
                eof.cancel()
                await asyncio.gather(eof, return_exceptions=True)
                try:
                    status, ctype, payload = work.result()
                except Exception as e:  # a bug in the fake: answer like uvicorn would
                    status, ctype = 500, "text/plain"
                    payload = f"Internal Server Error: {e!r}".encode()
                head = (f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
                        f"content-type: {ctype}\r\ncontent-length: {len(payload)}\r\n"
                        f"server: fake-sglang/{VERSION}\r\n\r\n")
                writer.write(head.encode("latin-1") + payload)
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError,
                asyncio.CancelledError):  # a connection handler ends quietly when stopped
            return
        finally:
            self._conns.pop(writer, None)
            writer.close()

    async def _dispatch(self, method: str, path: str, query: dict, raw: bytes, authorization: str | None = None):
        if method != "OPTIONS" and not auth_allowed(path, authorization, self.api_key):
            return 401, "application/json", b'{"error":"Unauthorized"}'
        routes = {**ROUTES, **FAKE_ROUTES}
        if path not in routes:
            return 404, "application/json", b'{"detail":"Not Found"}'
        if method not in routes[path]:
            return 405, "application/json", b'{"detail":"Method Not Allowed"}'
        if path == "/_fake/calls":
            return 200, "application/json", json.dumps(self.calls).encode()
        if path == "/_fake/loras":
            info = {"loaded": self.lora._names(), "ever": list(self.lora.ref_cache)}
            return 200, "application/json", json.dumps(info).encode()
        if path == "/_fake/launch":
            info = {"dtype": self.dtype, "host": self.host, "keyed": bool(self.api_key),
                    "env": {k: os.environ.get(k) for k in LAUNCH_ENV}}
            return 200, "application/json", json.dumps(info).encode()
        if path in ("/health", "/health_generate"):
            starting = time.monotonic() - self._started < self.startup_delay
            return (503 if starting else 200), "text/plain", b""
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError as e:
            body, status, payload = None, 400, _validation_error(f"JSON decode error: {e}").payload
        else:
            call = {"method": method, "path": path, "body": body}
            self.calls.append(call)
            handler = getattr(self, "_h_" + path.strip("/"))
            try:
                status, payload = await handler(body, query)
            except BadRequest as e:
                status, payload = e.status, e.payload
            call.update(status=status, reply=payload)
        if self.reply_hook is not None:
            payload = self.reply_hook(path, payload)
        if isinstance(payload, str):
            return status, "text/plain; charset=utf-8", payload.encode()
        if payload is None:
            return status, "text/plain", b""
        return status, "application/json", json.dumps(payload).encode()

    # ---- info

    def _model_info(self) -> dict:
        return {"model_path": self.model_path, "served_model_name": self.model_path,
                "tokenizer_path": self.model_path, "is_generation": True,
                "preferred_sampling_params": None, "weight_version": self.weight_version,
                "load_format": "auto", "reasoning_parser": None, "tool_call_parser": None,
                "disaggregation_mode": "null", "has_image_understanding": False,
                "has_audio_understanding": False, "model_type": "llama",
                "architectures": ["LlamaForCausalLM"]}

    async def _h_model_info(self, body, query):
        return 200, self._model_info()

    _h_get_model_info = _h_model_info

    # ---- generation

    async def _h_generate(self, body, query):
        if not isinstance(body, dict):
            raise BadRequest({"error": "invalid type: expected struct GenerateRequest"})
        ids = body.get("input_ids")
        if ids is None:
            raise BadRequest({"error": {"message": "Either text, input_ids or input_embeds "
                                                   "should be provided."}})
        single = bool(ids) and isinstance(ids[0], int)
        prompts = [ids] if single else ids
        if not prompts or any(not p for p in prompts):
            raise BadRequest({"error": {"message": "input_ids cannot be empty."}})
        sps = body.get("sampling_params") or {}
        sp_list = sps if isinstance(sps, list) else [sps] * len(prompts)
        for sp in sp_list:
            unknown = [k for k in sp if k not in SAMPLING_FIELDS]
            if unknown:
                listed = ", ".join(f"`{f}`" for f in SAMPLING_FIELDS)
                raise BadRequest({"error": f"unknown field `{unknown[0]}`, expected one of "
                                           f"{listed}"})
        if len(sp_list) != len(prompts):
            raise BadRequest({"error": {"message": "sampling_params length mismatch"}})
        n = sp_list[0].get("n", 1)
        if any(sp.get("n", 1) != n for sp in sp_list):
            raise BadRequest({"error": {"message": "The parallel_sample_num should be the same "
                                                   "for all samples in sample params."}})
        rid = body.get("rid")
        if isinstance(rid, list) and len(rid) != len(prompts):
            raise BadRequest({"error": {"message": "The specified rids length mismatch with the "
                                                   "batch_size for batch processing."}})
        await self._unpaused.wait()  # the tokenizer manager holds new requests while paused
        while self.writers_waiting:  # RWLock.acquire_reader waits for waiting writers
            await asyncio.sleep(0.005)
        adapters = await self.lora.resolve(body.get("lora_path"), len(prompts), n)
        reqs = []
        for i, (p, sp) in enumerate(zip(prompts, sp_list)):
            for j in range(n):
                if n == 1 and rid is not None:
                    r = rid[i] if isinstance(rid, list) else (rid if single else f"{rid}_{i}")
                else:  # SGLang regenerates rids for parallel samples
                    r = uuid.uuid4().hex
                reqs.append(Req(r, list(p), j, sp))
                reqs[-1].lora_id, reqs[-1].key = adapters[i * n + j]
        for r in reqs:  # the radix cache's keys include the adapter's lora_id
            r.cached_tokens = len(r.prompt) if (r.lora_id, *r.prompt) in self._cache else 0
            self.running[r.rid] = r
        try:
            results = await asyncio.gather(*(self._run(r) for r in reqs))
        finally:
            for r in reqs:
                self.running.pop(r.rid, None)
        for r in reqs:
            self._cache.add((r.lora_id, *r.prompt))
        return 200, (results[0] if single and n == 1 else results)

    async def _run(self, r: Req) -> dict:
        sp = r.params
        max_new = sp.get("max_new_tokens", 128)
        stops = set(sp.get("stop_token_ids") or [])
        min_new = sp.get("min_new_tokens", 0)
        finish: dict
        while True:
            if r.abort_message is not None:
                finish = {"type": "abort", "message": r.abort_message, "status_code": None,
                          "err_type": None}
                break
            if len(r.output) >= max_new:
                finish = {"type": "length", "length": max_new}
                break
            await asyncio.sleep(self.token_delay)
            while not self._unpaused.is_set() and r.abort_message is None:
                await asyncio.sleep(0.005)  # retract / in_place: the scheduler does not step
            if r.abort_message is not None:
                continue
            ctx = r.prompt + r.output
            salt = r.salt if not r.output else 0
            weights = r.key or self.weight_version  # an adapter's own weights, else the version's
            tok = fake_token(ctx, weights, self.vocab_size, salt)
            r.output.append(tok)
            r.logprobs.append(fake_logprob(ctx, weights, salt))
            if tok in stops and not sp.get("ignore_eos") and len(r.output) >= min_new:
                finish = {"type": "stop", "matched": tok}
                break
        spans = _spans(r.events, self.weight_version, len(r.output))
        return {"text": "", "output_ids": list(r.output),
                "meta_info": {"id": r.rid, "finish_reason": finish,
                              "prompt_tokens": len(r.prompt),
                              "weight_version": spans[-1]["version"], "num_retractions": 0,
                              "output_token_logprobs": [[lp, t, None] for lp, t in
                                                        zip(r.logprobs, r.output)],
                              "reasoning_tokens": 0, "completion_tokens": len(r.output),
                              "cached_tokens": r.cached_tokens, "weight_versions": spans,
                              "e2e_latency": time.monotonic() - r.started}}

    async def _h_abort_request(self, body, query):
        _fields(body, {"rid": (str, False), "abort_all": (bool, False)})
        for r in list(self.running.values()):
            if body.get("abort_all") or (body.get("rid") and r.rid == body["rid"]):
                r.abort_message = "Abort in waiting queue" if not r.output else "Aborted"
        return 200, None

    # ---- pause / continue / flush

    async def _h_pause_generation(self, body, query):
        _fields(body, {"mode": (str, False)})
        mode = body.get("mode", "abort")
        if mode not in ("abort", "retract", "in_place"):
            raise _validation_error(f"Input should be 'abort', 'retract' or 'in_place': {mode!r}")
        self.pause_mode = mode
        self._unpaused.clear()
        if mode == "abort":  # abort every request, then wait until none is left in flight
            while self.running:
                for r in self.running.values():
                    r.abort_message = r.abort_message or "Aborted"
                await asyncio.sleep(0.005)
        return 200, {"message": "Generation paused successfully.", "status": "ok"}

    async def _h_continue_generation(self, body, query):
        _fields(body, {"torch_empty_cache": (bool, False)})
        self.pause_mode = None
        self._unpaused.set()
        return 200, {"message": "Generation continued successfully.", "status": "ok"}

    def _idle(self) -> bool:
        # Scheduler.is_fully_idle(ignore_waiting=paused): retracted requests wait and do not count
        return not self.running or self.pause_mode in ("abort", "retract")

    def _flush(self) -> bool:
        if not self._idle():
            return False
        self._cache.clear()
        return True

    async def _h_flush_cache(self, body, query):
        timeout = float(query.get("timeout", 0.0))
        deadline = time.monotonic() + timeout
        while not self._idle() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._flush():
            return 200, FLUSH_OK_TEXT
        if timeout > 0:
            return 400, "Timed out waiting for idle state."
        return 400, "Flush cache failed.\n"

    # ---- weight updates

    async def _h_init_weights_update_group(self, body, query):
        _fields(body, {"master_address": (str, True), "master_port": (int, True),
                       "rank_offset": (int, True), "world_size": (int, True),
                       "group_name": (str, False), "backend": (str, False)})
        name = body.get("group_name", "weight_update_group")
        first, world = body["rank_offset"], body["world_size"]
        backend = body.get("backend", "nccl")
        if first + self.tp_size > world:
            return 400, {"success": False, "message": "Failed to initialize custom process "
                         f"group: ranks {first}..{first + self.tp_size - 1} do not fit "
                         f"world_size {world}."}
        # every TP rank joins the trainer's TCP rendezvous as rank_offset + tp_rank; the
        # request answers once all of them (and the trainer) are in
        init_method = f"tcp://{body['master_address']}:{body['master_port']}"
        while len(self._workers) < self.tp_size:
            self._workers.append(await asyncio.to_thread(_TPWorker))
        try:
            await asyncio.gather(*(asyncio.to_thread(
                w.call, "init", backend, init_method, world, first + tp, name, self.group_timeout)
                for tp, w in enumerate(self._workers)))
        except Exception as e:
            return 400, {"success": False,
                         "message": f"Failed to initialize custom process group: {e}."}
        self.groups[name] = dict(body)
        return 200, {"success": True, "message": "Succeeded to initialize custom process group."}

    async def _h_destroy_weights_update_group(self, body, query):
        _fields(body, {"group_name": (str, False)})
        name = body.get("group_name", "weight_update_group")
        if self.groups.pop(name, None) is None:
            return 400, {"success": False, "message": "The group to be destroyed does not exist."}
        try:
            await asyncio.gather(*(asyncio.to_thread(w.call, "destroy", name)
                                   for w in self._workers))
        except Exception as e:
            return 400, {"success": False,
                         "message": f"Failed to destroy custom process group: {e}."}
        return 200, {"success": True, "message": "Succeeded to destroy custom process group."}

    async def _h_begin_weight_update(self, body, query):
        _fields(body, {"selector": (str, False)})
        if self.session_open:
            return 400, {"success": False, "message": "a weight-update session is already "
                                                      "open; call end_weight_update() first"}
        self.session_open = True
        return 200, {"success": True, "message": "Success"}

    async def _h_end_weight_update(self, body, query):
        _fields(body, {})
        if not self.session_open:
            return 400, {"success": False, "message": "no weight-update session is open; call "
                                                      "begin_weight_update() first"}
        self.session_open = False
        if self.dump_weights and self.weights:
            await asyncio.to_thread(self._dump, dict(self.weights), self.weight_version)
        return 200, {"success": True, "message": "Success"}

    def _dump(self, weights: dict, version: str) -> None:
        from safetensors.torch import save_file
        os.makedirs(self.dump_weights, exist_ok=True)
        tmp = os.path.join(self.dump_weights, ".weights.tmp")
        save_file({k: v.clone() for k, v in weights.items()}, tmp, metadata={"version": version})
        os.replace(tmp, os.path.join(self.dump_weights, "weights.safetensors"))

    def _set_version(self, version: str | None) -> None:
        if version is None or version == self.weight_version:
            return
        for r in self.running.values():  # Scheduler.record_weight_version_change
            if r.output:
                r.events.append((self.weight_version, len(r.output)))
        self.weight_version = version

    async def _h_update_weights_from_distributed(self, body, query):
        _fields(body, {"names": (list, True), "dtypes": (list, True), "shapes": (list, True),
                       "group_name": (str, False), "flush_cache": (bool, False),
                       "abort_all_requests": (bool, False), "weight_version": (str, False),
                       "load_format": (str, False), "selector": (str, False),
                       "torch_empty_cache": (bool, False)})
        if refused := self._outside_session("update_weights_from_distributed"):
            return refused
        names, dtypes, shapes = body["names"], body["dtypes"], body["shapes"]
        group = body.get("group_name", "weight_update_group")
        problem = None
        if group not in self.groups:
            problem = f"process group {group!r} is not initialized"
        elif not len(names) == len(dtypes) == len(shapes):
            problem = f"{len(names)} names, {len(dtypes)} dtypes, {len(shapes)} shapes"
        elif bad := [d for d in dtypes if d not in DTYPES]:
            problem = f"module 'torch' has no attribute '{bad[0]}'"
        elif any(not isinstance(s, list) or not all(isinstance(d, int) for d in s) for s in shapes):
            problem = f"bad shapes {shapes!r}"
        if problem:
            return 400, {"success": False, "message": f"Failed to receive weights: {problem}"}
        self.update_in_flight += 1
        try:
            await asyncio.sleep(self.update_delay)
            # every TP rank receives one broadcast from rank 0 per tensor, in list order
            received = await asyncio.gather(*(asyncio.to_thread(
                w.call, "receive", group, names, dtypes, shapes) for w in self._workers))
        except Exception as e:
            return 400, {"success": False, "message": f"Failed to update parameter online: {e}. "
                         "The full weights of the ModelRunner are partially updated. Please "
                         "discard the whole weights."}
        finally:
            self.update_in_flight -= 1
        self.weights.update(received[0])
        self.received.append({"names": names, "dtypes": dtypes, "shapes": shapes,
                              "group_name": group, "weight_version": body.get("weight_version")})
        return self._after_update(body, "Succeeded to update parameter online.")

    def _outside_session(self, op: str) -> tuple[int, dict] | None:
        """The refusal of a weight update `op` outside begin/end_weight_update; None inside a session."""
        if self.session_open:
            return None
        return 400, {"success": False, "message": NOT_IN_SESSION.format(op=op)}

    def _after_update(self, body: dict, message: str, **extra):
        version = body.get("weight_version")
        if body.get("flush_cache", True) and not self._flush():
            return 400, {"success": False, "message": FLUSH_BUSY, **extra}
        self._set_version(version)
        if version is not None:
            message += f" Weight version updated to {version}."
        return 200, {"success": True, "message": message, **extra}

    async def _h_update_weights_from_tensor(self, body, query):
        _fields(body, {"serialized_named_tensors": (list, True), "load_format": (str, False),
                       "flush_cache": (bool, False), "abort_all_requests": (bool, False),
                       "weight_version": (str, False), "selector": (str, False),
                       "torch_empty_cache": (bool, False)})
        if refused := self._outside_session("update_weights_from_tensor"):
            return refused
        return self._after_update(body, "Success")

    async def _h_update_weight_version(self, body, query):
        _fields(body, {"new_version": (str, True), "abort_all_requests": (bool, False)})
        if body.get("abort_all_requests", True):  # TokenizerManager.abort_request(abort_all=True)
            for r in self.running.values():
                r.abort_message = r.abort_message or "Aborted"
        self._set_version(body["new_version"])
        return 200, {"success": True, "message": f"Weight version updated to {body['new_version']}",
                     "new_version": body["new_version"]}

    async def _h_load_lora_adapter(self, body, query):
        return await self.lora.h_load(body)

    async def _h_unload_lora_adapter(self, body, query):
        return await self.lora.h_unload(body)

    async def _h_update_weights_from_disk(self, body, query):
        _fields(body, {"model_path": (str, True), "load_format": (str, False),
                       "abort_all_requests": (bool, False), "weight_version": (str, False),
                       "flush_cache": (bool, False)})
        path = body["model_path"]
        if not os.path.exists(path):
            return 400, {"success": False, "num_paused_requests": 0,
                         "message": f"Failed to get weights iterator: {path} (repository not "
                                    "found)."}
        if body.get("abort_all_requests"):  # TokenizerManager.abort_request(abort_all=True)
            for r in self.running.values():
                r.abort_message = r.abort_message or "Aborted"
        self.writers_waiting += 1
        try:
            while self.pause_mode is None and self.running:  # the model_update_lock writer waits
                await asyncio.sleep(0.01)
            await asyncio.sleep(self.update_delay)
        finally:
            self.writers_waiting -= 1
        self.model_path = path
        return self._after_update(body, "Succeeded to update model weights.",
                                  num_paused_requests=0)


def init_custom_process_group(backend, init_method, world_size, rank, group_name, timeout):
    """sglang.srt.utils.common.init_custom_process_group (0.5.23), as the server calls it."""
    import datetime

    from torch.distributed.distributed_c10d import (Backend, PrefixStore,
                                                    _new_process_group_helper, _world, rendezvous)
    timeout = datetime.timedelta(seconds=timeout)
    store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store,
                                      group_name=group_name, backend_options=None,
                                      timeout=timeout)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


class _TPWorker:
    """One TP rank's process (SGLang runs a scheduler process per TP rank; torch also cannot
    host two ranks of one gloo rendezvous in one process). It joins weight-update groups and
    receives broadcasts; the HTTP side calls it over a pipe."""

    def __init__(self):
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_tp_worker_main, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        self._lock = __import__("threading").Lock()

    def call(self, op: str, *args, timeout: float = 120.0):
        with self._lock:
            self.conn.send((op, args))
            if not self.conn.poll(timeout):
                raise TimeoutError(f"TP worker: {op} took over {timeout:g} s")
            ok, value = self.conn.recv()
        if not ok:
            raise RuntimeError(value)
        return value

    def close(self) -> None:
        try:
            self.conn.send(("exit", ()))
        except (OSError, BrokenPipeError):
            pass
        self.proc.join(2)
        if self.proc.is_alive():  # e.g. still inside a collective whose peer is gone
            self.proc.kill()
            self.proc.join()


def _tp_worker_main(conn) -> None:
    import torch
    import torch.distributed as dist
    groups = {}
    while True:
        try:
            op, args = conn.recv()
        except EOFError:
            os._exit(0)
        try:
            if op == "exit":  # at once: torch's gloo threads can hold up interpreter shutdown
                os._exit(0)
            if op == "init":
                backend, init_method, world, rank, name, timeout = args
                groups[name] = init_custom_process_group(backend, init_method, world, rank, name,
                                                         timeout)
                value = None
            elif op == "receive":  # ModelRunner.receive_weights_from_distributed
                name, names, dtypes, shapes = args
                value, handles = {}, []
                for n, dtype, shape in zip(names, dtypes, shapes):
                    t = torch.empty(shape, dtype=getattr(torch, dtype))
                    handles.append(dist.broadcast(t, src=0, group=groups[name], async_op=True))
                    value[n] = t
                for h in handles:
                    h.wait()
            elif op == "destroy":
                pg = groups.pop(args[0], None)
                if pg is not None:
                    dist.destroy_process_group(pg)
                value = None
            conn.send((True, value))
        except Exception as e:
            conn.send((False, f"{type(e).__name__}: {e}"))


def _spans(events: list[tuple[str, int]], current: str, n: int) -> list[dict]:
    """sglang.srt.utils.weight_versions.compute_weight_version_spans, as JSON."""
    spans: list[dict] = []
    for version, end in [*events, (current, n)]:
        end = min(end, n)
        if spans and end <= spans[-1]["end"]:
            continue
        if spans and version == spans[-1]["version"]:
            spans[-1]["end"] = end
            continue
        spans.append({"version": version, "start": spans[-1]["end"] if spans else 0, "end": end})
    return spans


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="fake SGLang 0.5.23 server for tests")
    ap.add_argument("--model-path", default="fake-model")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--tp-size", type=int, default=1)
    ap.add_argument("--weight-version", default="default")
    ap.add_argument("--mem-fraction-static", type=float)
    ap.add_argument("--random-seed", type=int)
    ap.add_argument("--skip-tokenizer-init", action="store_true")
    ap.add_argument("--api-key")
    ap.add_argument("--dtype", choices=("auto", "half", "float16", "bfloat16", "float", "float32"))
    ap.add_argument("--enable-lora", action="store_true")
    ap.add_argument("--max-lora-rank", type=int)
    ap.add_argument("--lora-target-modules", nargs="*")
    ap.add_argument("--max-loras-per-batch", type=int, default=8)
    ap.add_argument("--startup-delay", type=float, default=0.0, help="fake: 503 for this long")
    ap.add_argument("--token-delay", type=float, default=0.002, help="fake: seconds per token")
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--update-delay", type=float, default=0.0)
    ap.add_argument("--dump-weights", help="fake: write received weights here at each update")
    args = ap.parse_args(argv)
    fake = FakeSGLang(host=args.host, port=args.port, model_path=args.model_path,
                      tp_size=args.tp_size, weight_version=args.weight_version,
                      startup_delay=args.startup_delay, token_delay=args.token_delay,
                      vocab_size=args.vocab_size, update_delay=args.update_delay,
                      dump_weights=args.dump_weights, api_key=args.api_key, dtype=args.dtype,
                      enable_lora=args.enable_lora, max_lora_rank=args.max_lora_rank,
                      lora_target_modules=args.lora_target_modules)

    async def serve():
        if args.enable_lora:  # the base weights the adapters merge into, read before serving (as SGLang's model)
            await asyncio.to_thread(fake.lora.base)
        await fake.start()
        print(f"fake sglang {VERSION}: serving {args.model_path} on {fake.url}", flush=True)
        await asyncio.sleep(args.startup_delay)
        print("The server is fired up and ready to roll!", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
