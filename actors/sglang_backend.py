"""Generator backend that drives one SGLang 0.5.23 server over HTTP.

SGLang runs the policy on GPUs; this module only speaks its HTTP protocol (facts in SGLANG.md,
checked against sglang 0.5.23's http_server.py and io_struct.py): starting a server and waiting
for it, /generate with per-token logprobs and weight versions, the paused
begin/update/flush/end weight-update session over NCCL, and resuming partial rollouts that a
weight update aborted. Every call has a deadline; every failure names the server and the phase.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import httpx2
import orjson

log = logging.getLogger(__name__)

PAUSE_MODES = ("abort", "retract", "in_place")
FINISH_REASONS = ("stop", "length", "abort")
DEFAULT_GROUP = "weight_update_group"
DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's own default when a request names none
# Sampling keys this backend forwards (a subset of SGLang's SamplingParams); `n` is an argument.
SAMPLING_KEYS = frozenset(
    {"temperature", "top_p", "top_k", "max_new_tokens", "min_new_tokens",
     "stop_token_ids", "ignore_eos", "sampling_seed"}
)
# dtype names SGLang's receiver resolves with getattr(torch, name), with their sizes.
DTYPE_BYTES = {
    "float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1,
    "float8_e5m2": 1, "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
}


# ---------------------------------------------------------------- errors


class SGLangError(Exception):
    """Base: every failure names the server URL and the phase it happened in."""

    def __init__(self, url: str, phase: str, detail: str):
        self.url, self.phase, self.detail = url, phase, detail
        super().__init__(f"sglang at {url}: {phase}: {detail}")


class SGLangTimeout(SGLangError):
    def __init__(self, url: str, phase: str, timeout: float, detail: str = ""):
        self.timeout = timeout
        extra = f"; {detail}" if detail else ""
        super().__init__(url, phase, f"timed out after {timeout:g} s{extra}")


class SGLangUnreachable(SGLangError):
    """Connection refused, reset or dropped: the server is down or died mid-request."""


class SGLangRefused(SGLangError):
    """The server answered with an error status or {success: false}; quotes its message."""

    def __init__(self, url: str, phase: str, status: int, message: str):
        self.status, self.message = status, message
        super().__init__(url, phase, f"refused (HTTP {status}): {message}")


class SGLangProtocolError(SGLangError):
    """The reply does not have the shape SGLang 0.5.23 gives; names the field."""

    def __init__(self, url: str, phase: str, field: str, problem: str):
        self.field = field
        super().__init__(url, phase, f"malformed reply: {field}: {problem}")


class SGLangLaunchError(SGLangError):
    """The launched server exited before it became healthy; quotes its last log lines."""

    def __init__(self, url: str, returncode: int, log_tail: Sequence[str]):
        self.returncode, self.log_tail = returncode, list(log_tail)
        tail = "\n".join(f"  | {line}" for line in self.log_tail) or "  | (no output)"
        super().__init__(url, "launch", f"server exited with code {returncode} before it was "
                                        f"healthy; last log lines:\n{tail}")


class MalformedReply(ValueError):
    """Raised by the pure parsers; the client turns it into SGLangProtocolError."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"{field}: {problem}")


# ---------------------------------------------------------------- data


class TensorMeta(NamedTuple):
    """One full (unsharded) HF parameter as the trainer broadcasts it."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass
class GenSample:
    """One generated response: tokens, their behaviour logprobs and the policy version of each.
    (Field names match actors.generator.Sample, so rollout_batch takes either.)"""

    output_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: str  # stop | length | abort
    rid: str = ""
    resumes: int = 0  # how often a partial rollout was resubmitted after an abort


@dataclass
class SGLangLaunch:
    """How to start a server: `python -m sglang.launch_server --model-path M --port P ...`."""

    model_path: str
    port: int
    tp_size: int = 1
    mem_fraction_static: float | None = None
    random_seed: int | None = None
    extra_args: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    initial_version: int = 0  # sent as --weight-version so replies carry an integer version
    command: list[str] | None = None  # default [python, -m, sglang.launch_server]
    log_file: str | None = None  # also append the server's output here
    log_lines: int = 40  # how many last lines an error quotes
    stop_timeout: float = 15.0  # SIGTERM grace before SIGKILL

    def __post_init__(self):
        if not self.model_path:
            raise ValueError("SGLangLaunch.model_path is empty")
        if not 0 < self.port < 65536:
            raise ValueError(f"SGLangLaunch.port={self.port} is not a TCP port")
        if self.tp_size < 1:
            raise ValueError(f"SGLangLaunch.tp_size={self.tp_size} must be >= 1")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static < 1:
            raise ValueError(f"SGLangLaunch.mem_fraction_static={self.mem_fraction_static} "
                             "must be in (0, 1)")
        if self.initial_version < 0:
            raise ValueError(f"SGLangLaunch.initial_version={self.initial_version} must be >= 0")
        if not all(isinstance(a, str) for a in self.extra_args):
            raise ValueError(f"SGLangLaunch.extra_args must be strings, got {self.extra_args!r}")


def launch_argv(cfg: SGLangLaunch) -> list[str]:
    """The command line that starts the server (0.5.23 also accepts `sglang serve`)."""
    argv = list(cfg.command) if cfg.command else [sys.executable, "-m", "sglang.launch_server"]
    argv += ["--model-path", cfg.model_path, "--host", cfg.host, "--port", str(cfg.port),
             "--tp-size", str(cfg.tp_size), "--weight-version", str(cfg.initial_version)]
    if cfg.mem_fraction_static is not None:
        argv += ["--mem-fraction-static", str(cfg.mem_fraction_static)]
    if cfg.random_seed is not None:
        argv += ["--random-seed", str(cfg.random_seed)]
    return argv + list(cfg.extra_args)


# ---------------------------------------------------------------- pure protocol


def normalize_sampling(sampling: dict) -> dict:
    """Validate the sampling dict once; fills SGLang's max_new_tokens default explicitly."""
    if not isinstance(sampling, dict):
        raise ValueError(f"sampling must be a dict, got {type(sampling).__name__}")
    sampling = {k: v for k, v in sampling.items() if v is not None}  # None: server default
    unknown = sorted(set(sampling) - SAMPLING_KEYS)
    if unknown:
        hint = " (pass n as the generate() argument)" if "n" in unknown else ""
        raise ValueError(f"sampling has unknown key(s) {unknown}{hint}; "
                         f"allowed: {sorted(SAMPLING_KEYS)}")
    out = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, **sampling}

    def number(key, ok, want):
        v = out.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v)):
            raise ValueError(f"sampling[{key!r}]={v!r}: expected {want}")

    def integer(key, ok, want):
        v = out.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not ok(v)):
            raise ValueError(f"sampling[{key!r}]={v!r}: expected {want}")

    number("temperature", lambda v: v >= 0, "a number >= 0")
    number("top_p", lambda v: 0 < v <= 1, "a number in (0, 1]")
    integer("top_k", lambda v: v == -1 or v >= 1, "-1 (off) or an int >= 1")
    integer("max_new_tokens", lambda v: v >= 1, "an int >= 1")
    integer("min_new_tokens", lambda v: v >= 0, "an int >= 0")
    integer("sampling_seed", lambda v: True, "an int")
    stops = out.get("stop_token_ids")
    if stops is not None:
        if not isinstance(stops, (list, tuple)) or not all(_is_token(t) for t in stops):
            raise ValueError(f"sampling['stop_token_ids']={stops!r}: expected a list of token ids")
        out["stop_token_ids"] = list(stops)
    if "ignore_eos" in out and not isinstance(out["ignore_eos"], bool):
        raise ValueError(f"sampling['ignore_eos']={out['ignore_eos']!r}: expected a bool")
    return out


def _is_token(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def check_prompts(input_ids: Any, rids: Sequence[str] | None = None) -> list[list[int]]:
    """Prompts must be a non-empty list of non-empty token-id lists (SGLang refuses empty ones)."""
    if not isinstance(input_ids, (list, tuple)) or not input_ids:
        raise ValueError("input_ids must be a non-empty list of prompts (lists of token ids)")
    prompts = []
    for i, p in enumerate(input_ids):
        if not isinstance(p, (list, tuple)) or not p:
            raise ValueError(f"input_ids[{i}] must be a non-empty list of token ids, got {p!r:.60}")
        bad = next((t for t in p if not _is_token(t)), None)
        if bad is not None:
            raise ValueError(f"input_ids[{i}] holds {bad!r}, not a token id (int >= 0)")
        prompts.append(list(p))
    if rids is not None:
        if len(rids) != len(prompts):
            raise ValueError(f"rids has {len(rids)} entries for {len(prompts)} prompts")
        if len(set(rids)) != len(rids) or not all(isinstance(r, str) and r for r in rids):
            raise ValueError(f"rids must be distinct non-empty strings, got {list(rids)!r}")
    return prompts


def generate_body(prompts: list[list[int]], sampling_params: dict | list[dict], n: int,
                  rids: Sequence[str] | None = None) -> dict:
    """POST /generate body: always a batch, so the reply is always a list (index i*n + j)."""
    if isinstance(sampling_params, dict):
        sp: dict | list[dict] = {**sampling_params, "n": n}
    else:
        if n != 1:
            raise ValueError("per-prompt sampling params need n == 1 (SGLang requires one n)")
        sp = [{**p, "n": 1} for p in sampling_params]
    body = {"input_ids": prompts, "sampling_params": sp, "return_logprob": True}
    if rids is not None:
        body["rid"] = list(rids)
    return body


def parse_version(value: Any, field: str) -> int:
    """SGLang versions are strings; ours are ints. 'default' is SGLang's name for the weights
    it loaded at start, which is version 0 unless the server was launched with another."""
    if value == "default":
        return 0
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise MalformedReply(field, f"{value!r} is not an integer policy version")


def token_versions(meta: dict, n_tokens: int, at: str) -> list[int]:
    """Per-token versions: 0.5.23 reports spans {version, start, end} when a request outlived
    a weight update (retract / in_place pause); otherwise one weight_version for all tokens."""
    spans = meta.get("weight_versions")
    if spans:
        if not isinstance(spans, list):
            raise MalformedReply(f"{at}.weight_versions", "expected a list of spans")
        out: list[int | None] = [None] * n_tokens
        for k, s in enumerate(spans):
            f = f"{at}.weight_versions[{k}]"
            if not isinstance(s, dict) or not all(key in s for key in ("version", "start", "end")):
                raise MalformedReply(f, "expected {version, start, end}")
            v = parse_version(s["version"], f"{f}.version")
            start, end = s["start"], s["end"]
            if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
                raise MalformedReply(f, f"bad range start={start!r} end={end!r}")
            for t in range(start, min(end, n_tokens)):
                out[t] = v
        missing = [t for t, v in enumerate(out) if v is None]
        if missing:
            raise MalformedReply(f"{at}.weight_versions", f"spans leave token {missing[0]} "
                                 f"of {n_tokens} without a version")
        return out  # type: ignore[return-value]
    if "weight_version" not in meta:
        raise MalformedReply(f"{at}.weight_version", "missing")
    return [parse_version(meta["weight_version"], f"{at}.weight_version")] * n_tokens


def parse_result(r: Any, at: str) -> GenSample:
    """One element of a /generate reply into a GenSample, or MalformedReply naming the field."""
    if not isinstance(r, dict):
        raise MalformedReply(at, f"expected an object, got {type(r).__name__}")
    ids = r.get("output_ids")
    if not isinstance(ids, list) or not all(_is_token(t) for t in ids):
        raise MalformedReply(f"{at}.output_ids", "missing or not a list of token ids")
    meta = r.get("meta_info")
    if not isinstance(meta, dict):
        raise MalformedReply(f"{at}.meta_info", "missing or not an object")
    fr = meta.get("finish_reason")
    if not isinstance(fr, dict) or fr.get("type") not in FINISH_REASONS:
        raise MalformedReply(f"{at}.meta_info.finish_reason",
                             f"expected {{type: stop|length|abort}}, got {fr!r:.80}")
    lps = meta.get("output_token_logprobs")
    f = f"{at}.meta_info.output_token_logprobs"
    if not isinstance(lps, list):
        raise MalformedReply(f, "missing (was return_logprob sent?) or not a list")
    if len(lps) != len(ids):
        raise MalformedReply(f, f"{len(lps)} entries for {len(ids)} output_ids")
    logprobs = []
    for k, (e, tok) in enumerate(zip(lps, ids)):
        if not isinstance(e, (list, tuple)) or len(e) != 3:
            raise MalformedReply(f"{f}[{k}]", f"expected [logprob, token_id, text], got {e!r:.60}")
        lp, eid = e[0], e[1]
        if isinstance(lp, bool) or not isinstance(lp, (int, float)):
            raise MalformedReply(f"{f}[{k}][0]", f"logprob {lp!r} is not a number")
        if eid != tok:
            raise MalformedReply(f"{f}[{k}][1]", f"token id {eid!r} != output_ids[{k}]={tok}")
        logprobs.append(float(lp))
    versions = token_versions(meta, len(ids), f"{at}.meta_info")
    rid = meta.get("id", "")
    return GenSample(list(ids), logprobs, versions, fr["type"], rid if isinstance(rid, str) else "")


def parse_generate_reply(reply: Any, n_results: int) -> list[GenSample]:
    if not isinstance(reply, list):
        raise MalformedReply("reply", f"expected a list of {n_results} results, "
                                      f"got {type(reply).__name__}")
    if len(reply) != n_results:
        raise MalformedReply("reply", f"expected {n_results} results, got {len(reply)}")
    return [parse_result(r, f"reply[{k}]") for k, r in enumerate(reply)]


def check_tensor_meta(named_meta: Sequence[Any]) -> list[TensorMeta]:
    """Validate (name, dtype, shape) triples; 'torch.bfloat16' is accepted as 'bfloat16'."""
    out = []
    for k, m in enumerate(named_meta):
        if not isinstance(m, (tuple, list)) or len(m) != 3:
            raise ValueError(f"named_meta[{k}]={m!r:.80} is not (name, dtype, shape)")
        name, dtype, shape = m
        dtype = str(dtype).removeprefix("torch.")
        if not isinstance(name, str) or not name:
            raise ValueError(f"named_meta[{k}] has no name: {m!r:.80}")
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"tensor {name!r}: dtype {m[1]!r} is not one of {sorted(DTYPE_BYTES)}")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ValueError(f"tensor {name!r}: shape {shape!r} is not a tuple of ints >= 0")
        out.append(TensorMeta(name, dtype, tuple(shape)))
    return out


def tensor_bytes(m: TensorMeta) -> int:
    n = DTYPE_BYTES[m.dtype]
    for d in m.shape:
        n *= d
    return n


def bucket_tensors(named_meta: Sequence[Any], bucket_bytes: int) -> list[list[TensorMeta]]:
    """Split in list order (the broadcast order) into buckets of at most bucket_bytes each;
    a tensor larger than the budget goes alone."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes={bucket_bytes} must be > 0")
    buckets: list[list[TensorMeta]] = []
    size = 0
    for m in check_tensor_meta(named_meta):
        b = tensor_bytes(m)
        if not buckets or size + b > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(m)
        size += b
    return buckets


def update_bucket_body(bucket: Sequence[TensorMeta], group_name: str, version: int) -> dict:
    """POST /update_weights_from_distributed body; the flush comes once, after all buckets."""
    return {"names": [m.name for m in bucket], "dtypes": [m.dtype for m in bucket],
            "shapes": [list(m.shape) for m in bucket], "group_name": group_name,
            "flush_cache": False, "weight_version": str(version)}


def reply_message(content: bytes) -> str:
    """The human message in an SGLang error reply: {message}, {error: {message}}, {error: str},
    or plain text (/flush_cache answers text)."""
    try:
        obj = orjson.loads(content)
    except orjson.JSONDecodeError:
        return content.decode("utf-8", "replace").strip()[:2000] or "(empty reply)"
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if isinstance(err, str):
            return err
        if "message" in obj:
            return str(obj["message"])
        if "detail" in obj:
            return str(obj["detail"])
    return str(obj)[:2000]


def _resume_params(params: dict, done: int) -> dict:
    out = {**params, "max_new_tokens": params["max_new_tokens"] - done}
    if "min_new_tokens" in out:
        out["min_new_tokens"] = max(0, out["min_new_tokens"] - done)
    return out


def _concat(first: GenSample, more: GenSample) -> GenSample:
    return GenSample(first.output_ids + more.output_ids, first.logprobs + more.logprobs,
                     first.versions + more.versions, more.finish_reason, more.rid or first.rid,
                     first.resumes + 1)


# ---------------------------------------------------------------- server process


class _ServerProcess:
    """A launched server: its process group, and a pump that keeps its last log lines."""

    def __init__(self, cfg: SGLangLaunch):
        self.cfg = cfg
        self.tail: deque[str] = deque(maxlen=cfg.log_lines)
        self.proc: asyncio.subprocess.Process | None = None
        self._pump_task: asyncio.Task | None = None

    async def start(self) -> None:
        argv = launch_argv(self.cfg)
        log.info("starting sglang: %s", " ".join(argv))
        self.proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True, limit=1 << 20)
        self._pump_task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        assert self.proc and self.proc.stdout
        sink = open(self.cfg.log_file, "a", encoding="utf-8") if self.cfg.log_file else None
        try:
            while raw := await self.proc.stdout.readline():
                line = raw.decode("utf-8", "replace").rstrip()
                self.tail.append(line)
                log.debug("[sglang:%d] %s", self.cfg.port, line)
                if sink:
                    sink.write(line + "\n")
                    sink.flush()
        except (ValueError, ConnectionError):  # an over-long line or a closed pipe
            pass
        finally:
            if sink:
                sink.close()

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    async def drain(self, timeout: float = 2.0) -> None:
        """Let the pump read what the dead process last wrote."""
        if self._pump_task:
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._pump_task), timeout)

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self._signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), self.cfg.stop_timeout)
            except asyncio.TimeoutError:
                log.warning("sglang on port %d ignored SIGTERM for %g s; killing it",
                            self.cfg.port, self.cfg.stop_timeout)
                self._signal(signal.SIGKILL)
                await self.proc.wait()
        else:  # the leader is gone; its workers may not be
            self._signal(signal.SIGKILL)
        await self.drain()
        if self._pump_task and not self._pump_task.done():
            self._pump_task.cancel()

    def _signal(self, sig: int) -> None:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)  # the group we created with start_new_session


# ---------------------------------------------------------------- client


class SGLangBackend:
    """Async client for one SGLang server, optionally the launcher of that server.

    `await start()` (or `async with`) launches the server if `launch` is given and waits until
    GET /health answers 200. Timeouts: `request_timeout` bounds one /generate call,
    `control_timeout` the short control calls, `health_timeout` the start-up wait,
    `update_timeout` each weight-update bucket and the group init (both wait for the trainer).
    """

    def __init__(self, url: str | None = None, *, launch: SGLangLaunch | None = None,
                 request_timeout: float = 3600.0, health_timeout: float = 600.0,
                 control_timeout: float = 60.0, update_timeout: float = 600.0,
                 progress_interval: float = 10.0):
        if url is None and launch is None:
            raise ValueError("SGLangBackend needs a url or a launch config")
        if url is None:
            host = "127.0.0.1" if launch.host in ("0.0.0.0", "::") else launch.host
            url = f"http://{host}:{launch.port}"
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"SGLangBackend url {url!r} must start with http:// or https://")
        for name, v in [("request_timeout", request_timeout), ("health_timeout", health_timeout),
                        ("control_timeout", control_timeout), ("update_timeout", update_timeout),
                        ("progress_interval", progress_interval)]:
            if not v > 0:
                raise ValueError(f"SGLangBackend {name}={v} must be > 0")
        self.url = url.rstrip("/")
        self.launch = launch
        self.request_timeout, self.health_timeout = request_timeout, health_timeout
        self.control_timeout, self.update_timeout = control_timeout, update_timeout
        self.progress_interval = progress_interval
        self._server = _ServerProcess(launch) if launch else None
        self._http: httpx2.AsyncClient | None = None
        self._update_lock = asyncio.Lock()
        self.version = 0  # the server's weight version: read at start, bumped by our updates

    # ---- lifecycle

    async def start(self, wait: bool = True) -> "SGLangBackend":
        """Launch the server (if configured) and, unless wait=False, wait until it is healthy.
        On failure the launched server is stopped again."""
        if self._http is None:
            # trust_env=False: a cluster's HTTP(S)_PROXY must not capture server traffic.
            self._http = httpx2.AsyncClient(
                base_url=self.url, trust_env=False,
                timeout=httpx2.Timeout(None, connect=min(10.0, self.control_timeout)),
                limits=httpx2.Limits(max_connections=None, max_keepalive_connections=64))
        try:
            if self._server and self._server.proc is None:
                await self._server.start()
            if wait:
                await self.wait_healthy()
                self.version = await self.weight_version()
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        if self._server is not None:
            await self._server.stop()

    async def __aenter__(self) -> "SGLangBackend":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def pid(self) -> int | None:
        """Process id of the launched server (None when connected by URL)."""
        return self._server.proc.pid if self._server and self._server.proc else None

    @property
    def returncode(self) -> int | None:
        """Exit code of the launched server once it has exited; None while it runs."""
        return self._server.returncode if self._server else None

    # ---- transport

    async def _request(self, method: str, path: str, phase: str, body: Any = None,
                       timeout: float | None = None) -> httpx2.Response:
        if self._http is None:
            raise RuntimeError(f"SGLangBackend({self.url}) used before start()")
        timeout = self.control_timeout if timeout is None else timeout
        kwargs: dict[str, Any] = {}
        if body is not None:
            kwargs["content"] = orjson.dumps(body)
            kwargs["headers"] = {"content-type": "application/json"}
        try:
            return await asyncio.wait_for(self._http.request(method, path, **kwargs), timeout)
        except asyncio.TimeoutError:
            raise SGLangTimeout(self.url, phase, timeout) from None
        except httpx2.TransportError as e:
            reason = f"{type(e).__name__}: {str(e) or 'connection lost'}"
            raise SGLangUnreachable(self.url, phase, reason) from e

    async def _post(self, path: str, body: Any, phase: str | None = None,
                    timeout: float | None = None) -> Any:
        """POST and return the JSON reply; an error status or {success: false} raises."""
        phase = phase or path.lstrip("/")
        resp = await self._request("POST", path, phase, body, timeout)
        if resp.status_code != 200:
            raise SGLangRefused(self.url, phase, resp.status_code, reply_message(resp.content))
        if not resp.content:
            return None  # /abort_request answers an empty 200
        try:
            obj = orjson.loads(resp.content)
        except orjson.JSONDecodeError:
            raise SGLangProtocolError(self.url, phase, "reply", f"not JSON: "
                                      f"{resp.content[:200]!r}") from None
        if isinstance(obj, dict) and obj.get("success") is False:
            raise SGLangRefused(self.url, phase, resp.status_code, str(obj.get("message", obj)))
        return obj

    # ---- health and info

    async def _health_status(self, timeout: float | None = None) -> int:
        resp = await self._request("GET", "/health", "health", timeout=timeout or 10.0)
        return resp.status_code

    async def health(self, timeout: float | None = None) -> bool:
        """True on 200, False on 503 (starting or shutting down); unreachable raises."""
        return await self._health_status(timeout) == 200

    async def wait_healthy(self, timeout: float | None = None) -> None:
        """Poll GET /health until 200, logging progress; a launched server that dies is an error."""
        timeout = self.health_timeout if timeout is None else timeout
        t0 = time.monotonic()
        last_log = t0
        state = "not polled yet"
        while True:
            if self._server and self._server.returncode is not None:
                await self._server.drain()
                raise SGLangLaunchError(self.url, self._server.returncode, self._server.tail)
            elapsed = time.monotonic() - t0
            try:
                status = await self._health_status(timeout=max(1.0, min(10.0, timeout - elapsed)))
                if status == 200:
                    log.info("sglang at %s is healthy after %.0f s", self.url, elapsed)
                    return
                state = f"{status} starting" if status == 503 else f"HTTP {status}"
            except (SGLangUnreachable, SGLangTimeout) as e:
                state = f"not answering ({e.detail})"
            now = time.monotonic()
            if now - t0 >= timeout:
                tail = ""
                if self._server and self._server.tail:
                    tail = "; last log lines:\n" + "\n".join(f"  | {s}" for s in self._server.tail)
                raise SGLangTimeout(self.url, "health", timeout, f"last: {state}{tail}")
            if now - last_log >= self.progress_interval:
                log.info("waiting for sglang at %s: %s, %.0f s of %.0f s",
                         self.url, state, now - t0, timeout)
                last_log = now
            await asyncio.sleep(min(0.25, max(0.0, timeout - (now - t0))))

    async def model_info(self, timeout: float | None = None) -> dict:
        resp = await self._request("GET", "/model_info", "model_info", timeout=timeout)
        if resp.status_code != 200:
            raise SGLangRefused(self.url, "model_info", resp.status_code,
                                reply_message(resp.content))
        try:
            info = orjson.loads(resp.content)
        except orjson.JSONDecodeError:
            raise SGLangProtocolError(self.url, "model_info", "reply", "not JSON") from None
        if not isinstance(info, dict) or "weight_version" not in info:
            raise SGLangProtocolError(self.url, "model_info", "weight_version", "missing")
        return info

    async def weight_version(self, timeout: float | None = None) -> int:
        info = await self.model_info(timeout)
        try:
            return parse_version(info["weight_version"], "weight_version")
        except MalformedReply as e:
            raise SGLangProtocolError(self.url, "model_info", e.field, e.problem) from None

    # ---- generation

    async def generate(self, input_ids: list[list[int]], n: int, sampling: dict,
                       rids: Sequence[str] | None = None, *,
                       timeout: float | None = None) -> list[list[GenSample]]:
        """n samples per prompt, grouped per prompt. With n > 1 SGLang gives every sample a
        fresh rid (GenSample.rid), so `rids` only tag the shared-prefix requests."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n={n!r} must be an int >= 1")
        prompts = check_prompts(input_ids, rids)
        params = normalize_sampling(sampling)
        flat = await self._generate_raw(prompts, params, n, rids, timeout)
        return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]

    async def _generate_raw(self, prompts: list[list[int]], params: dict | list[dict], n: int,
                            rids: Sequence[str] | None, timeout: float | None) -> list[GenSample]:
        body = generate_body(prompts, params, n, rids)
        resp = await self._request("POST", "/generate", "generate", body,
                                   self.request_timeout if timeout is None else timeout)
        if resp.status_code != 200:
            raise SGLangRefused(self.url, "generate", resp.status_code, reply_message(resp.content))
        try:
            return parse_generate_reply(orjson.loads(resp.content), len(prompts) * n)
        except orjson.JSONDecodeError:
            raise SGLangProtocolError(self.url, "generate", "reply",
                                      f"not JSON: {resp.content[:200]!r}") from None
        except MalformedReply as e:
            raise SGLangProtocolError(self.url, "generate", e.field, e.problem) from None

    async def generate_resumable(self, input_ids: list[list[int]], n: int, sampling: dict,
                                 rids: Sequence[str] | None = None, *, max_resumes: int = 100,
                                 timeout: float | None = None) -> list[list[GenSample]]:
        """generate(), but samples that a pause(mode='abort') cut short are resubmitted as
        prompt + tokens so far with the remaining budget, and their outputs concatenated;
        every token keeps the version that produced it. (A resubmission sent while the server
        is paused waits there until continue_generation.) To stop it, cancel the task: the
        dropped connection makes SGLang abort the request."""
        groups = await self.generate(input_ids, n, sampling, rids, timeout=timeout)
        params = normalize_sampling(sampling)
        budget = params["max_new_tokens"]
        for _ in range(max_resumes):
            todo = []
            for i, group in enumerate(groups):
                for j, s in enumerate(group):
                    if s.finish_reason == "abort":
                        if len(s.output_ids) >= budget:
                            s.finish_reason = "length"
                        else:
                            todo.append((i, j))
            if not todo:
                return groups
            log.info("sglang at %s: resuming %d aborted partial rollout(s)", self.url, len(todo))
            prompts = [list(input_ids[i]) + groups[i][j].output_ids for i, j in todo]
            per = [_resume_params(params, len(groups[i][j].output_ids)) for i, j in todo]
            more = await self._generate_raw(prompts, per, 1, None, timeout)
            for (i, j), extra in zip(todo, more):
                groups[i][j] = _concat(groups[i][j], extra)
        left = sum(s.finish_reason == "abort" for g in groups for s in g)
        if left:
            log.warning("sglang at %s: %d sample(s) still aborted after %d resumes",
                        self.url, left, max_resumes)
        return groups

    async def generate_group(self, rid: str, prompt_ids: list[int], n: int,
                             sampling: dict) -> list[GenSample]:
        """One prompt's n samples, resumed across weight updates (the generator's Backend call)."""
        return (await self.generate_resumable([prompt_ids], n, sampling, rids=[rid]))[0]

    async def abort(self, rid: str | None = None, timeout: float | None = None) -> None:
        """Abort one request by rid, or every request when rid is None (abort_all)."""
        body = {"abort_all": True} if rid is None else {"rid": rid}
        await self._post("/abort_request", body, "abort_request", timeout)

    # ---- pause / resume / cache

    async def pause(self, mode: str = "abort", timeout: float | None = None) -> None:
        """abort: in-flight requests end now with their partial output (finish_reason abort);
        retract: they go back to the queue and recompute after resume(); in_place: they stay
        (and /flush_cache keeps failing until resume())."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode {mode!r} is not one of {PAUSE_MODES}")
        await self._post("/pause_generation", {"mode": mode}, "pause_generation", timeout)

    async def resume(self, timeout: float | None = None) -> None:
        await self._post("/continue_generation", {}, "continue_generation", timeout)

    async def flush_cache(self, timeout: float | None = None) -> None:
        """Flush the radix cache; SGLang answers 400 while requests run, so retry until the
        deadline."""
        timeout = self.control_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        delay, attempts, last = 0.02, 0, ""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SGLangTimeout(self.url, "flush_cache", timeout,
                                    f"still refused after {attempts} attempts: {last}")
            resp = await self._request("POST", "/flush_cache", "flush_cache", timeout=left)
            attempts += 1
            if resp.status_code == 200:
                return
            if resp.status_code != 400:
                raise SGLangRefused(self.url, "flush_cache", resp.status_code,
                                    reply_message(resp.content))
            last = reply_message(resp.content)
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.5)

    # ---- weight updates

    async def init_weights_group(self, master_address: str, master_port: int, rank_offset: int,
                                 world_size: int, group_name: str = DEFAULT_GROUP, *,
                                 backend: str = "nccl", timeout: float | None = None) -> None:
        """Make the server join the trainer's weight-update group (torch.distributed, `backend`
        nccl on GPUs, gloo on CPUs). SGLang answers only once every rank has joined, so run this
        concurrently with the trainer's own join (actors.weight_group.TrainerGroup.join)."""
        if not 0 < rank_offset < world_size:
            raise ValueError(f"rank_offset={rank_offset} must be in [1, world_size={world_size})"
                             " (rank 0 is the trainer)")
        body = {"master_address": master_address, "master_port": int(master_port),
                "rank_offset": rank_offset, "world_size": world_size,
                "group_name": group_name, "backend": backend}
        await self._post("/init_weights_update_group", body, "init_weights_update_group",
                         self.update_timeout if timeout is None else timeout)

    async def update_bucket(self, bucket: Sequence[Any], version: int,
                            group_name: str = DEFAULT_GROUP, *,
                            timeout: float | None = None) -> None:
        """One POST /update_weights_from_distributed; returns when SGLang received the bucket
        (the trainer broadcasts it meanwhile). Valid only between begin/end_weight_update."""
        body = update_bucket_body(check_tensor_meta(bucket), group_name, version)
        await self._post("/update_weights_from_distributed", body,
                         "update_weights_from_distributed",
                         self.update_timeout if timeout is None else timeout)

    async def update_weights_from_disk(self, path: str, version: int, *,
                                       timeout: float | None = None) -> None:
        """Fallback without NCCL: SGLang loads a checkpoint directory (and always flushes)."""
        body = {"model_path": str(path), "weight_version": str(version)}
        async with self._update_lock:
            await self._post("/update_weights_from_disk", body, "update_weights_from_disk",
                             self.update_timeout if timeout is None else timeout)
            self.version = version
