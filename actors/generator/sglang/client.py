"""Async HTTP client for one SGLang 0.5.23 server: health, generation, pause/flush, weight calls.

Every call has a deadline; every failure names the server URL and the phase (actors.generator.sglang.protocol
errors). /generate asks for per-token logprobs and weight versions, and resumes partial rollouts
that a pause (mode abort) cut short. The weight-update session that drives several servers at once
is actors.weights.sglang_distributed; launching a server is actors.generator.sglang.server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import httpx2
import orjson

from actors.generator.sglang.protocol import (DEFAULT_GROUP, PAUSE_MODES, MalformedReply, Sample, SGLangError,
                                    SGLangProtocolError, SGLangRefused, SGLangTimeout, SGLangUnreachable,
                                    _concat, _resume_params, check_prompts, check_tensor_meta,
                                    generate_body, load_lora_body, normalize_sampling, parse_generate_reply,
                                    parse_version, reply_message, unload_lora_body, update_bucket_body,
                                    weight_version_body)

log = logging.getLogger("actors.generator.sglang.client")
# names the file holding the job's SGLang API key (the launcher writes it; the path is no secret)
API_KEY_FILE_ENV = "BOBA_SGLANG_KEY_FILE"


def job_api_key() -> str | None:
    """The job's SGLang API key (the file API_KEY_FILE_ENV names), else None: every client of the
    job's servers, the generator's and the learner's weight group, sends it without being told."""
    path = os.environ.get(API_KEY_FILE_ENV)
    if not path:
        return None
    try:
        key = open(path, encoding="ascii").read().strip()
    except OSError as e:
        raise ValueError(f"{API_KEY_FILE_ENV}={path}: cannot read the job's SGLang API key ({e.strerror})") from None
    if not key:
        raise ValueError(f"{API_KEY_FILE_ENV}={path}: the job's SGLang API key file is empty")
    return key


class SGLangClient:
    """Async client for one SGLang server at `url`.

    `await start()` (or `async with`) opens the connection pool and, unless wait=False, waits
    until GET /health answers 200. Timeouts: `request_timeout` bounds one /generate call,
    `control_timeout` the short control calls, `health_timeout` the start-up wait,
    `update_timeout` each weight-update bucket and the group init (both wait for the trainer).
    """

    def __init__(self, url: str, *, request_timeout: float = 3600.0, health_timeout: float = 600.0,
                 control_timeout: float = 60.0, update_timeout: float = 600.0,
                 progress_interval: float = 10.0, api_key: str | None = None):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"SGLang url {url!r} must start with http:// or https://")
        for name, v in [("request_timeout", request_timeout), ("health_timeout", health_timeout),
                        ("control_timeout", control_timeout), ("update_timeout", update_timeout),
                        ("progress_interval", progress_interval)]:
            if not v > 0:
                raise ValueError(f"SGLang client {name}={v} must be > 0")
        self.url = url.rstrip("/")
        self.request_timeout, self.health_timeout = request_timeout, health_timeout
        self.control_timeout, self.update_timeout = control_timeout, update_timeout
        self.progress_interval = progress_interval
        self._api_key = api_key if api_key is not None else job_api_key()  # not in any repr or log
        self._http: httpx2.AsyncClient | None = None
        self._update_lock = asyncio.Lock()
        self.version = 0  # the server's weight version: read at start, then from its replies
        # LoRA: the adapter every /generate names (None: the base weights), each loaded adapter's policy
        # version, and how many of our requests in flight name each one (actors.generator.sglang.adapters)
        self.lora_name: str | None = None
        self._adapter_versions: dict[str, int] = {}
        self._using: dict[str, int] = {}
        self._unused = asyncio.Condition()

    # ---- lifecycle

    async def start(self, wait: bool = True) -> "SGLangClient":
        """Open the connection pool and, unless wait=False, wait until the server is healthy."""
        if self._http is None:
            # trust_env=False: a cluster's HTTP(S)_PROXY must not capture server traffic.
            self._http = httpx2.AsyncClient(
                base_url=self.url, trust_env=False,
                headers={"Authorization": f"Bearer {self._api_key}"} if self._api_key else None,
                timeout=httpx2.Timeout(None, connect=min(10.0, self.control_timeout)),
                limits=httpx2.Limits(max_connections=None, max_keepalive_connections=64))
        try:
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

    async def __aenter__(self) -> "SGLangClient":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _exited(self) -> SGLangError | None:
        """Hook for a client that launched its server: the error once that process has exited."""
        return None

    def _log_tail(self) -> list[str]:
        """Hook: the launched server's last log lines, for error messages."""
        return []

    # ---- transport

    async def _request(self, method: str, path: str, phase: str, body: Any = None,
                       timeout: float | None = None) -> httpx2.Response:
        if self._http is None:
            raise RuntimeError(f"SGLangClient({self.url}) used before start()")
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
            raise SGLangRefused(self.url, phase, resp.status_code, reply_message(resp.content))
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
            exited = await self._exited()
            if exited is not None:
                raise exited
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
                if self._log_tail():
                    tail = "; last log lines:\n" + "\n".join(f"  | {s}" for s in self._log_tail())
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
                       timeout: float | None = None) -> list[list[Sample]]:
        """n samples per prompt, grouped per prompt. With n > 1 SGLang gives every sample a
        fresh rid (Sample.rid), so `rids` only tag the shared-prefix requests."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n={n!r} must be an int >= 1")
        prompts = check_prompts(input_ids, rids)
        params = normalize_sampling(sampling)
        flat = await self._generate_raw(prompts, params, n, rids, timeout)
        for k, sample in enumerate(flat):
            sample.index = k % n  # sample j of its prompt's group
        return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]

    async def _generate_raw(self, prompts: list[list[int]], params: dict | list[dict], n: int,
                            rids: Sequence[str] | None, timeout: float | None) -> list[Sample]:
        lora = self.lora_name  # read at submission: a resubmission after a swap names the new adapter
        body = generate_body(prompts, params, n, rids, lora)
        if lora is not None:
            self._using[lora] = self._using.get(lora, 0) + 1
        try:
            resp = await self._request("POST", "/generate", "generate", body,
                                       self.request_timeout if timeout is None else timeout)
        finally:
            if lora is not None:
                await self._release(lora)
        if resp.status_code != 200:
            raise SGLangRefused(self.url, "generate", resp.status_code, reply_message(resp.content))
        try:
            samples = parse_generate_reply(orjson.loads(resp.content), len(prompts) * n)
        except orjson.JSONDecodeError:
            raise SGLangProtocolError(self.url, "generate", "reply",
                                      f"not JSON: {resp.content[:200]!r}") from None
        except MalformedReply as e:
            raise SGLangProtocolError(self.url, "generate", e.field, e.problem) from None
        version = self._adapter_versions.get(lora) if lora is not None else None
        if version is not None:  # SGLang fixes a request's adapter at admission: its tokens are that adapter's
            for s in samples:
                s.versions = [version] * len(s.output_ids)
        return samples

    async def _release(self, lora: str) -> None:
        self._using[lora] -= 1
        if not self._using[lora]:
            del self._using[lora]
            async with self._unused:
                self._unused.notify_all()

    async def generate_resumable(self, input_ids: list[list[int]], n: int, sampling: dict,
                                 rids: Sequence[str] | None = None, *, max_resumes: int = 100,
                                 timeout: float | None = None) -> list[list[Sample]]:
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
                             sampling: dict) -> list[Sample]:
        """One prompt's n samples, resumed across weight updates (the generator's Backend call)."""
        group = (await self.generate_resumable([prompt_ids], n, sampling, rids=[rid]))[0]
        self.version = max([self.version, *(v for s in group for v in s.versions)])
        return group

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
        concurrently with the trainer's own join (actors.weights.sglang_distributed.TrainerGroup.join)."""
        if not 0 < rank_offset < world_size:
            raise ValueError(f"rank_offset={rank_offset} must be in [1, world_size={world_size})"
                             " (rank 0 is the trainer)")
        body = {"master_address": master_address, "master_port": int(master_port),
                "rank_offset": rank_offset, "world_size": world_size,
                "group_name": group_name, "backend": backend}
        await self._post("/init_weights_update_group", body, "init_weights_update_group",
                         self.update_timeout if timeout is None else timeout)

    async def destroy_weights_group(self, group_name: str = DEFAULT_GROUP, *,
                                    timeout: float | None = None) -> None:
        """Make the server leave a weight-update group (before a group without it is formed)."""
        await self._post("/destroy_weights_update_group", {"group_name": group_name},
                         "destroy_weights_update_group", timeout)

    async def begin_weight_update(self, timeout: float | None = None) -> None:
        """Open the 0.5.23 update session; distributed updates are refused outside one."""
        await self._post("/begin_weight_update", {}, "begin_weight_update", timeout)

    async def end_weight_update(self, timeout: float | None = None) -> None:
        await self._post("/end_weight_update", {}, "end_weight_update", timeout)

    async def update_bucket(self, bucket: Sequence[Any], version: int,
                            group_name: str = DEFAULT_GROUP, *,
                            timeout: float | None = None) -> None:
        """One POST /update_weights_from_distributed; returns when SGLang received the bucket
        (the trainer broadcasts it meanwhile). Valid only between begin/end_weight_update."""
        body = update_bucket_body(check_tensor_meta(bucket), group_name, version)
        await self._post("/update_weights_from_distributed", body,
                         "update_weights_from_distributed",
                         self.update_timeout if timeout is None else timeout)

    async def update_weights_from_disk(self, path: str, version: int, *, abort_all_requests: bool = False,
                                       timeout: float | None = None) -> None:
        """Fallback without NCCL: SGLang loads a checkpoint directory (and always flushes). It waits
        for the requests in flight (holding new ones meanwhile), or with abort_all_requests ends
        them first with their partial output (generate_group resubmits them under the new weights)."""
        body = {"model_path": str(path), "weight_version": str(version), "abort_all_requests": abort_all_requests}
        async with self._update_lock:
            await self._post("/update_weights_from_disk", body, "update_weights_from_disk",
                             self.update_timeout if timeout is None else timeout)
            self.version = version

    # ---- LoRA adapters (SGLang launched with --enable-lora)

    async def load_lora_adapter(self, name: str, path: str, *, timeout: float | None = None) -> None:
        """The server reads the PEFT directory ``path`` (it must see it) and serves it as ``name``."""
        await self._post("/load_lora_adapter", load_lora_body(name, path), "load_lora_adapter",
                         self.update_timeout if timeout is None else timeout)

    async def unload_lora_adapter(self, name: str, *, timeout: float | None = None) -> None:
        """SGLang answers once no request that names ``name`` runs any more."""
        await self._post("/unload_lora_adapter", unload_lora_body(name), "unload_lora_adapter",
                         self.update_timeout if timeout is None else timeout)

    async def update_weight_version(self, version: int, *, abort_all_requests: bool,
                                    timeout: float | None = None) -> None:
        """The version /model_info and later replies report; abort_all_requests ends those in flight."""
        await self._post("/update_weight_version", weight_version_body(version, abort_all_requests),
                         "update_weight_version", timeout)
        self.version = version

    def use_adapter(self, name: str, version: int) -> str | None:
        """From now on every /generate (resubmissions too) names adapter ``name`` whose tokens are policy
        ``version``; returns the adapter named before."""
        old, self.lora_name = self.lora_name, name
        self._adapter_versions[name] = version
        return old

    async def until_unused(self, name: str, timeout: float) -> bool:
        """Wait until no request of ours names adapter ``name`` (False when ``timeout`` ran out first)."""
        try:
            async with self._unused:
                await asyncio.wait_for(self._unused.wait_for(lambda: name not in self._using), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def forget_adapter(self, name: str) -> None:
        self._adapter_versions.pop(name, None)
