"""What the SGLang client and the weight-update session send, and what the fake answers, checked against sglang 0.5.23 itself.

Needs `pip install --no-deps sglang==0.5.23 msgspec` (skips otherwise). Importing sglang.srt
pulls CUDA-era packages (triton, a matching torchvision, aiohttp, IPython, ...), so this test
reads the installed package's source instead of importing it:
- routes and their body classes from sglang/srt/entrypoints/http_server.py (AST);
- the request classes from sglang/srt/managers/io_struct.py: their msgspec Struct definitions are
  executed alone, so `Cls(**body)` raises TypeError on an unknown or missing field exactly as the
  real class does, and a msgspec round trip checks the field types and Literal values;
- the /generate JSON contract the real route enforces, and the reply schema, from
  sglang/api/v1/api_types.py (generated code that needs only msgspec), loaded by file path.
"""

import ast
import asyncio
import importlib.metadata
import importlib.util
import sys
import types
from pathlib import Path
from typing import Annotated, Any, Dict, List, Literal, Optional, Union

import pytest
import torch

msgspec = pytest.importorskip("msgspec")
_spec = importlib.util.find_spec("sglang")
if _spec is None or not _spec.submodule_search_locations:
    pytest.skip("sglang is not installed (pip install --no-deps sglang==0.5.23)",
                allow_module_level=True)
if importlib.metadata.version("sglang") != "0.5.23":
    pytest.skip(f"contract is pinned to sglang 0.5.23, found "
                f"{importlib.metadata.version('sglang')}", allow_module_level=True)
ROOT = Path(_spec.submodule_search_locations[0])

sys.path.insert(0, str(Path(__file__).parent))
import fake_sglang  # noqa: E402
from fake_sglang import FakeSGLang  # noqa: E402

from actors.generator.sglang.client import SGLangClient  # noqa: E402
from actors.weights.sglang_distributed import Server, SGLangWeightSync  # noqa: E402

META = [("model.embed_tokens.weight", "bfloat16", (64, 16)),
        ("model.layers.0.mlp.up_proj.weight", "bfloat16", (32, 16)),
        ("model.norm.weight", "float32", (16,))]


def load_api_types():
    name = "sglang_0523_api_types"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "api/v1/api_types.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def real_routes() -> dict[str, tuple[set[str], str | None]]:
    """path -> (methods, name of the body class) for every literal route in http_server.py."""
    tree = ast.parse((ROOT / "srt/entrypoints/http_server.py").read_text())
    routes: dict[str, tuple[set[str], str | None]] = {}
    for fn in tree.body:
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body_cls = None
        for arg in fn.args.args:
            ann = arg.annotation
            if (isinstance(ann, ast.Subscript) and isinstance(ann.value, ast.Name)
                    and ann.value.id == "Annotated" and isinstance(ann.slice, ast.Tuple)
                    and isinstance(ann.slice.elts[1], ast.Call)
                    and getattr(ann.slice.elts[1].func, "id", None) == "Body"):
                body_cls = ast.unparse(ann.slice.elts[0])
            elif isinstance(ann, ast.Name) and ann.id.endswith(("ReqInput", "Req")):
                body_cls = ann.id
        for dec in fn.decorator_list:
            if not (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute)
                    and getattr(dec.func.value, "id", None) == "app" and dec.args
                    and isinstance(dec.args[0], ast.Constant)):
                continue
            if dec.func.attr == "api_route":
                methods = {e.value for k in dec.keywords if k.arg == "methods"
                           for e in k.value.elts}
            else:
                methods = {dec.func.attr.upper()}
            known, _ = routes.get(dec.args[0].value, (set(), None))
            routes[dec.args[0].value] = (known | methods, body_cls)
    return routes


def io_struct_classes(names: set[str]) -> dict[str, type]:
    """The named msgspec request Structs of io_struct.py (and their bases), built from source."""
    path = ROOT / "srt/managers/io_struct.py"
    src = path.read_text()
    defs = {n.name: n for n in ast.parse(src).body if isinstance(n, ast.ClassDef)}
    order: list[str] = []

    def add(name):
        for base in defs[name].bases:
            if isinstance(base, ast.Name) and base.id in defs:
                add(base.id)
        if name not in order:
            order.append(name)

    for name in sorted(names):
        add(name)
    code = "from __future__ import annotations\n\n" + "\n\n".join(
        ast.get_source_segment(src, defs[n]) for n in order)
    module = types.ModuleType("sglang_0523_io_struct_subset")
    module.__dict__.update(
        msgspec=msgspec, Any=Any, Dict=Dict, List=List, Optional=Optional, Literal=Literal,
        Union=Union, Annotated=Annotated, FinishReasonDict=Dict[str, Any],
        WeightVersionSpans=List[Any], msgspec_struct_pydantic_core_schema=None)
    sys.modules[module.__name__] = module
    exec(compile(code, str(path), "exec"), module.__dict__)
    return {n: module.__dict__[n] for n in names}


def dataclass_fields(class_name: str) -> set[str]:
    src = (ROOT / "srt/managers/io_struct.py").read_text()
    cls = next(n for n in ast.parse(src).body
               if isinstance(n, ast.ClassDef) and n.name == class_name)
    return {s.target.id for s in cls.body if isinstance(s, ast.AnnAssign)}


def check_body(cls: type, body: dict) -> None:
    obj = cls(**body)  # TypeError: unknown or missing field
    msgspec.convert(msgspec.to_builtins(obj), cls)  # ValidationError: wrong type or Literal


async def run_every_backend_call(fake: FakeSGLang, tmp_path) -> None:
    async with SGLangClient(fake.url, request_timeout=20, control_timeout=5,
                             update_timeout=5) as b:
        await b.health()
        await b.model_info()
        await b.generate([[1, 2], [3]], 2, {"max_new_tokens": 4, "temperature": 0.6,
                                            "top_p": 0.95, "top_k": 20, "stop_token_ids": [7],
                                            "ignore_eos": False, "min_new_tokens": 1,
                                            "sampling_seed": 3}, rids=["p0", "p1"])
        sync = SGLangWeightSync(backend="gloo", master_address="127.0.0.1", bucket_bytes=2048,
                                call_timeout=10, collective_timeout=30, attempts=1)
        try:
            weights = {name: torch.zeros(shape, dtype=getattr(torch, dtype))
                       for name, dtype, shape in META}
            assert await sync.update([Server("g", fake.url)], weights, 1) == {"g"}  # forms the group
            task = asyncio.create_task(b.generate_resumable([[4, 5]], 2, {"max_new_tokens": 300}))
            await asyncio.sleep(0.05)
            assert await sync.update([Server("g", fake.url)], weights, 2) == {"g"}  # aborts it
            await task
            sync.pause_mode = "retract"
            assert await sync.update([Server("g", fake.url)], weights, 3) == {"g"}
        finally:
            await sync.close()
        await b.pause("in_place")
        await b.resume()
        await b.flush_cache()
        await b.update_weights_from_disk(str(tmp_path), 4)


async def fake_after_every_backend_call(tmp_path) -> FakeSGLang:
    """A fake server (stopped) whose `.calls` hold every kind of request the backend sends."""
    fake = FakeSGLang(weight_version="0", token_delay=0.005)
    await fake.start()
    try:
        await run_every_backend_call(fake, tmp_path)
    finally:
        await fake.stop()
    return fake


async def test_every_request_the_backend_sends_is_accepted_by_sglang_0523(tmp_path):
    fake = await fake_after_every_backend_call(tmp_path)
    routes, api = real_routes(), load_api_types()
    used = {routes[c["path"]][1] for c in fake.calls if c["path"] in routes}
    classes = io_struct_classes(used - {None, "GenerateReqInput"})
    generate_fields = dataclass_fields("GenerateReqInput")
    seen = set()
    for call in fake.calls:
        path, method, body = call["path"], call["method"], call["body"]
        assert path in routes, f"{path} is not a route of sglang 0.5.23"
        methods, cls = routes[path]
        assert method in methods, f"{method} {path}: sglang 0.5.23 allows {methods}"
        if path == "/generate":
            assert set(body) <= generate_fields, set(body) - generate_fields
            api.GenerateRequest.from_json_value(body)  # the route's own contract gate
        elif cls is not None:
            check_body(classes[cls], body)
        else:
            assert body is None, f"{path} takes no body in sglang 0.5.23"
        seen.add(path)
    assert seen == {"/model_info", "/generate", "/init_weights_update_group",
                    "/pause_generation", "/begin_weight_update",
                    "/update_weights_from_distributed", "/flush_cache", "/end_weight_update",
                    "/continue_generation", "/update_weights_from_disk",
                    "/destroy_weights_update_group"}


def test_the_checks_catch_a_drifted_body():
    classes = io_struct_classes({"UpdateWeightsFromDistributedReqInput",
                                 "PauseGenerationReqInput"})
    good = {"names": ["w"], "dtypes": ["bfloat16"], "shapes": [[2, 2]],
            "group_name": "weight_update_group", "flush_cache": False, "weight_version": "1"}
    check_body(classes["UpdateWeightsFromDistributedReqInput"], good)
    with pytest.raises(TypeError):  # the pre-mid-2025 single-tensor form
        check_body(classes["UpdateWeightsFromDistributedReqInput"],
                   {"name": "w", "dtype": "bfloat16", "shape": [2, 2]})
    with pytest.raises(msgspec.ValidationError):
        check_body(classes["UpdateWeightsFromDistributedReqInput"], {**good, "shapes": [["2"]]})
    with pytest.raises(msgspec.ValidationError):
        check_body(classes["PauseGenerationReqInput"], {"mode": "drain"})
    api = load_api_types()
    with pytest.raises(api.JsonContractError, match="unknown field `max_tokens`"):
        api.GenerateRequest.from_json_value({"input_ids": [[1]],
                                             "sampling_params": {"max_tokens": 3}})


def test_fake_routes_exist_in_sglang_0523_with_the_same_methods():
    routes = real_routes()
    for path, methods in fake_sglang.ROUTES.items():
        assert path in routes, path
        assert set(methods) <= routes[path][0], (path, methods, routes[path][0])


async def test_fake_replies_decode_with_the_sglang_0523_schema(tmp_path):
    fake = await fake_after_every_backend_call(tmp_path)
    api = load_api_types()
    finishes = set()
    for call in fake.calls:
        if call["path"] == "/generate":
            for item in call["reply"]:
                r = api.GenerateResponse.from_json_value(item)
                finish = r.meta_info.finish_reason
                assert isinstance(finish, (api.FinishStop, api.FinishLength, api.FinishAbort))
                finishes.add(type(finish).__name__)
                assert len(r.meta_info.output_token_logprobs) == len(r.output_ids)
                assert r.meta_info.weight_versions[-1].version == r.meta_info.weight_version
        elif call["path"] == "/model_info":
            assert api.GetModelInfoResponse.from_json_value(call["reply"]).weight_version == "0"
    assert finishes == {"FinishLength", "FinishAbort"}
