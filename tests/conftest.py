"""Suite-wide rules: `gpu` tests skip cleanly without CUDA; hypothesis is deterministic under CI.

With the environment variable CI set (CI runs with CI=true) the `ci` hypothesis profile is loaded:
derandomized examples, no example database, no deadline, so a fresh clone passes or fails the same
way every time instead of failing by luck.  Otherwise the `dev` profile explores random examples
(and keeps the local database, so a failure found once is replayed first).  Per-test `@settings`
only set `max_examples`/`deadline`/`database`, never `derandomize`, so the profile's choice holds.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True, max_examples=100, database=None, deadline=None,
                          print_blob=True)
settings.register_profile("dev", derandomize=False, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture
async def broker(request):
    """A broker on loopback with the test module's heartbeat interval (its `HB`, else 0.2 s)."""
    from bus.broker import Broker
    b = Broker(heartbeat_interval=getattr(request.module, "HB", 0.2))
    await b.start()
    yield b
    await b.stop()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's tokenizer: the converted copy when an earlier run made it (never converted here), else the GGUF."""
    from policies.model.loading import (SMOLLM2_NAME, ModelPathError, cache_root, check_model_dir, load_tokenizer,
                                        smollm2_gguf_path)
    try:
        return load_tokenizer(check_model_dir(cache_root() / SMOLLM2_NAME))
    except ModelPathError:
        pass
    try:
        return load_tokenizer(smollm2_gguf_path())
    except ModelPathError as e:
        pytest.skip(f"SmolLM2 not installed: {e}")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
