"""What the engine's output is checked against: the HF model's own logprobs and greedy tokens."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP's thread
    hand-offs make every small op slow; restore the setting for other modules.
    A module uses it by importing it (autouse)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_prompts(vocab: int, lengths, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_logprobs(model, prompt, output, temperature=1.0):
    """log_softmax(HF logits / T) of each output token given its prefix."""
    ids = torch.tensor(prompt + output)[None]
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(output)[:, None])[:, 0]


def hf_greedy(model, prompt, n_tokens):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n_tokens,
                             min_new_tokens=n_tokens, pad_token_id=0)
    return out[0, len(prompt):].tolist()
