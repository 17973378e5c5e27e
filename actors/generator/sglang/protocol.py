"""SGLang 0.5.23's HTTP protocol as pure data: errors, request bodies, reply parsers, tensor buckets.

No I/O here (the client is actors.generator.sglang.client): what is sent and what is accepted back, checked
against sglang 0.5.23's http_server.py and io_struct.py (facts in SGLANG.md), in one place that
tests/test_sglang_backend_contract.py holds against the real request classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import orjson

from policies.infer.sampling import Sample

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
# --lora-target-modules choices (sglang.srt.utils.common.SUPPORTED_LORA_TARGET_MODULES, 0.5.23)
LORA_TARGET_MODULES = frozenset({
    "q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "kv_a_proj_with_mqa", "q_b_proj", "kv_b_proj", "wq_b",
    "wk", "weights_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj", "embed_tokens",
    "lm_head", "qkvr", "wo_ud"})
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


# ---------------------------------------------------------------- tensors


class TensorMeta(NamedTuple):
    """One full (unsharded) HF parameter as the trainer broadcasts it."""

    name: str
    dtype: str
    shape: tuple[int, ...]


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
                  rids: Sequence[str] | None = None, lora_path: str | None = None) -> dict:
    """POST /generate body: always a batch, so the reply is always a list (index i*n + j).
    ``lora_path``: the loaded adapter's name (lora_name) every sample runs with; None = the base."""
    if isinstance(sampling_params, dict):
        sp: dict | list[dict] = {**sampling_params, "n": n}
    else:
        if n != 1:
            raise ValueError("per-prompt sampling params need n == 1 (SGLang requires one n)")
        sp = [{**p, "n": 1} for p in sampling_params]
    body = {"input_ids": prompts, "sampling_params": sp, "return_logprob": True}
    if rids is not None:
        body["rid"] = list(rids)
    if lora_path is not None:
        body["lora_path"] = lora_path
    return body


def load_lora_body(lora_name: str, lora_path: str) -> dict:
    """POST /load_lora_adapter (LoadLoRAAdapterReqInput): a PEFT directory the server reads itself.
    Not pinned: pinning only keeps it in the GPU pool, and ours is the one every request names."""
    return {"lora_name": lora_name, "lora_path": lora_path, "pinned": False}


def unload_lora_body(lora_name: str) -> dict:
    """POST /unload_lora_adapter (UnloadLoRAAdapterReqInput)."""
    return {"lora_name": lora_name}


def weight_version_body(version: int, abort_all_requests: bool) -> dict:
    """POST /update_weight_version (UpdateWeightVersionReqInput): with abort_all_requests the requests in
    flight end now with their partial output (finish_reason abort)."""
    return {"new_version": str(version), "abort_all_requests": abort_all_requests}


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


def parse_result(r: Any, at: str) -> Sample:
    """One element of a /generate reply into a Sample, or MalformedReply naming the field."""
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
    return Sample(list(ids), logprobs, versions, fr["type"], rid=rid if isinstance(rid, str) else "")


def parse_generate_reply(reply: Any, n_results: int) -> list[Sample]:
    if not isinstance(reply, list):
        raise MalformedReply("reply", f"expected a list of {n_results} results, "
                                      f"got {type(reply).__name__}")
    if len(reply) != n_results:
        raise MalformedReply("reply", f"expected {n_results} results, got {len(reply)}")
    return [parse_result(r, f"reply[{k}]") for k, r in enumerate(reply)]


def check_tensor_meta(named_meta: Sequence[Any]) -> list[TensorMeta]:
    """Validate (name, dtype, shape) triples (each name once); 'torch.bfloat16' is accepted as 'bfloat16'."""
    out = []
    seen: set[str] = set()
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
        if name in seen:
            raise ValueError(f"tensor {name!r} appears twice")
        seen.add(name)
        out.append(TensorMeta(name, dtype, tuple(shape)))
    return out


def tensor_bytes(m: TensorMeta) -> int:
    n = DTYPE_BYTES[m.dtype]
    for d in m.shape:
        n *= d
    return n


def bucket_tensors(named_meta: Sequence[Any], bucket_bytes: int) -> list[list[TensorMeta]]:
    """Split in list order (the broadcast order) into buckets of at most bucket_bytes each;
    a tensor larger than the budget goes alone. The one bucketing of weights (the tensor channels
    send a state dict whole)."""
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
        if obj.get("error_message"):  # LoRAUpdateOutput
            return str(obj["error_message"])
        if "detail" in obj:
            return str(obj["detail"])
    return str(obj)[:2000]


def _resume_params(params: dict, done: int) -> dict:
    out = {**params, "max_new_tokens": params["max_new_tokens"] - done}
    if "min_new_tokens" in out:
        out["min_new_tokens"] = max(0, out["min_new_tokens"] - done)
    return out


def _concat(first: Sample, more: Sample) -> Sample:
    return Sample(first.output_ids + more.output_ids, first.logprobs + more.logprobs,
                  first.versions + more.versions, more.finish_reason, rid=more.rid or first.rid,
                  index=first.index, resumes=first.resumes + 1)
