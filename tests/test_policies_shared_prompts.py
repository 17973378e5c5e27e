"""Shared prompts: the samples of a prompt run it through the model once, with the same results."""
import pytest
import torch

from policies.model.logprobs import packed_logprobs
from policies.model.loading import tiny_model
from policies.model.packed_attention import PACKED_SDPA
from policies.train.ppo import PPOConfig, make_optimizer, train_step
from policies.model.shared_prompts import prompt_lengths, share_prompts
from tensors.packed import PackedBatch


def groups(prompt_lens, response_lens, seed=0):
    """Sequences made of G responses to each prompt: (ids, cu_seqlens, loss_mask)."""
    g = torch.Generator().manual_seed(seed)
    seqs, masks = [], []
    for p, responses in zip(prompt_lens, response_lens):
        prompt = torch.randint(0, 49152, (p,), generator=g)
        for r in responses:
            seqs.append(torch.cat([prompt, torch.randint(0, 49152, (r,), generator=g)]))
            masks.append(torch.arange(p + r) >= p)
    cu = torch.tensor([0] + torch.tensor([len(s) for s in seqs]).cumsum(0).tolist(), dtype=torch.int32)
    return torch.cat(seqs), cu, torch.cat(masks)


def test_prompt_lengths_end_at_the_first_loss_token():
    mask = torch.tensor([0, 0, 1, 1, 0, 0, 0, 0, 1, 0], dtype=torch.bool)
    cu = torch.tensor([0, 4, 7, 10])  # the second sequence has no loss token: all of it is prompt
    assert prompt_lengths(mask, cu).tolist() == [2, 3, 1]


def test_a_repeated_prompt_is_kept_once():
    ids, cu, mask = groups([3, 2], [[2, 4], [1]])  # sequences: 3+2, 3+4, 2+1 tokens
    compact_of = share_prompts(ids, cu, prompt_lengths(mask, cu))
    # the second sequence's prompt maps onto the first's; everything else keeps its own place, in order
    assert compact_of.tolist() == [0, 1, 2, 3, 4] + [0, 1, 2, 5, 6, 7, 8] + [9, 10, 11]
    assert share_prompts(ids, cu, torch.tensor([3, 2, 2])) is None  # a different length: not the same prompt


def test_prompts_of_other_tokens_are_not_merged():
    ids, cu, mask = groups([4, 4], [[2], [3]])
    assert share_prompts(ids, cu, prompt_lengths(mask, cu)) is None


@pytest.mark.parametrize("responses", [[[5, 3, 6], [4, 4]], [[1, 30, 2], [25]]], ids=["similar", "skewed"])
def test_shared_prompt_values_and_gradients_equal_the_copies(responses):
    """"skewed" takes packed_sdpa's per-sequence path, "similar" its padded grid."""
    ids, cu, mask = groups([7, 5], responses, seed=3)
    prompt_lens = prompt_lengths(mask, cu)
    weights = torch.randn(ids.numel(), generator=torch.Generator().manual_seed(1))
    model = tiny_model(seed=1, attn_implementation=PACKED_SDPA)
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    results = []
    for kw in ({}, {"prompt_lens": prompt_lens}):
        model.zero_grad()
        lp, ent = packed_logprobs(model, ids, cu, with_entropy=True, only=mask, **kw)
        (lp * weights).sum().backward()
        results.append((lp.detach(), ent, [p.grad.clone() for p in model.parameters()]))
    hook.remove()
    shared_away = 7 * (len(responses[0]) - 1) + 5 * (len(responses[1]) - 1)
    assert seen == [ids.numel(), ids.numel() - shared_away]  # the copies never reached the model
    (lp_a, ent_a, grads_a), (lp_b, ent_b, grads_b) = results
    assert (lp_a[mask] < 0).all()
    torch.testing.assert_close(lp_b, lp_a, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent_b, ent_a, rtol=0, atol=1e-5)
    for (name, _), a, b in zip(model.named_parameters(), grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=3e-5, msg=name)


def test_train_step_with_shared_prompts_makes_the_same_update():
    ids, cu, mask = groups([6, 4], [[3, 5], [2, 6]], seed=5)
    seqs = [dict(input_ids=ids[a:b], loss_mask=mask[a:b], logprobs=torch.zeros(b - a),
                 rewards=[5.0, -5.0, -5.0, 5.0][i], group_ids=i // 2)
            for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist()))]
    batch = PackedBatch.from_sequences(seqs)
    updated = []
    for share in (False, True):
        model = tiny_model(seed=2, attn_implementation=PACKED_SDPA)
        cfg = PPOConfig(lr=1e-3, minibatches=1, share_prompts=share)
        train_step(model, make_optimizer(model, cfg), batch, cfg)
        updated.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    start = torch.cat([p.detach().flatten() for p in tiny_model(seed=2).parameters()])
    assert (updated[0] - start).abs().max() > 1e-4  # the step moved the weights
    torch.testing.assert_close(updated[1], updated[0], rtol=0, atol=1e-6)
