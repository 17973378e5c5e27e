"""Packed per-token logprobs: equal to running each sequence alone."""
import pytest
import torch
from torch import nn

from policies.model.logprobs import head_logprobs, packed_logprobs, position_ids_for
from policies.model.loading import tiny_model
from policies.model.packed_attention import PACKED_SDPA

LENGTHS = [5, 1, 17, 2, 40, 9]


def make_packed(lengths, seed=0, vocab=49152):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return seqs, torch.cat(seqs), cu


def alone(model, seq, temperature=1.0):
    """Reference: one sequence, ordinary forward, no packing."""
    with torch.no_grad():
        logp = torch.log_softmax(model(seq.unsqueeze(0)).logits[0].float() / temperature, -1)
    lp, ent = torch.zeros(len(seq)), torch.zeros(len(seq))
    lp[1:] = logp[:-1].gather(-1, seq[1:, None])[:, 0]
    ent[1:] = -(logp.exp() * logp).sum(-1)[:-1]
    return lp, ent


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0).eval()


def test_position_ids_restart_per_sequence():
    cu = torch.tensor([0, 3, 4, 6], dtype=torch.int32)
    assert position_ids_for(cu).tolist() == [0, 1, 2, 0, 0, 1]


@pytest.mark.parametrize("attn", ["sdpa", "eager", PACKED_SDPA])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("lengths", [LENGTHS, [9, 7, 8, 1]], ids=["skewed", "similar"])
def test_packed_equals_each_sequence_alone(attn, temperature, lengths):
    """"similar" lengths take packed_sdpa's padded-batch path, "skewed" ones its per-sequence path."""
    model = tiny_model(seed=1, attn_implementation=attn).eval()
    seqs, ids, cu = make_packed(lengths)
    with torch.no_grad():
        lp, ent = packed_logprobs(model, ids, cu, temperature=temperature, with_entropy=True)
    ref = [alone(model, s, temperature) for s in seqs]
    torch.testing.assert_close(lp, torch.cat([r[0] for r in ref]), rtol=0, atol=1e-5)
    # entropy (~ln V = 10.8 here) sums V terms: its fp32 rounding grows with it
    torch.testing.assert_close(ent, torch.cat([r[1] for r in ref]), rtol=4e-6, atol=1e-5)
    assert lp.dtype == torch.float32 and lp.shape == ids.shape
    assert (lp[cu[:-1].long()] == 0).all() and (lp[1:5] < 0).all()


@pytest.mark.parametrize("lengths", [LENGTHS, [9, 7, 8, 1]], ids=["skewed", "similar"])
def test_packed_sdpa_gradients_equal_each_sequence_alone(lengths):
    """Backward through the padded layout (pads, gathers, grouped query heads) gives the gradients
    of the sequences run one at a time."""
    seqs, ids, cu = make_packed(lengths)
    packed = tiny_model(seed=1, attn_implementation=PACKED_SDPA)
    ref = tiny_model(seed=1, attn_implementation="sdpa")
    assert packed.config.num_key_value_heads < packed.config.num_attention_heads  # grouped heads are covered
    packed_logprobs(packed, ids, cu)[0].sum().backward()
    for s in seqs:
        packed_logprobs(ref, s, torch.tensor([0, len(s)], dtype=torch.int32))[0].sum().backward()
    for (name, a), b in zip(packed.named_parameters(), ref.parameters()):
        # atol: fp32 sums over the 49152-token vocabulary differ by ~1e-5 between CPU kernels (AVX2 vs AVX512)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=3e-5, msg=name)


def test_packed_sdpa_model_still_honours_padding_masks():
    """Without sequence bounds packed_sdpa is plain SDPA with transformers' mask: a left-padded row
    gives the same last-token logits as the row alone."""
    model = tiny_model(seed=1, attn_implementation=PACKED_SDPA).eval()
    row = torch.tensor([5, 6, 7, 8])
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits[0, -1]
        unmasked = model(ids).logits[0, -1]
        torch.testing.assert_close(padded, model(row[None]).logits[0, -1], rtol=0, atol=1e-5)
    assert (unmasked - padded).abs().max() > 1e-4  # the mask mattered, so the check could fail


def test_attention_does_not_cross_sequences(model):
    """The same sequence gets the same logprobs whatever is packed before it; a plain forward over
    the concatenation (no resets) does not, so the check can fail."""
    seqs, ids, cu = make_packed([7, 11])
    other, _, _ = make_packed([13], seed=5)
    with torch.no_grad():
        lp_a, _ = packed_logprobs(model, ids, cu)
        ids_b = torch.cat([other[0], seqs[1]])
        lp_b, _ = packed_logprobs(model, ids_b, torch.tensor([0, 13, 24], dtype=torch.int32))
        torch.testing.assert_close(lp_a[7:], lp_b[13:], rtol=0, atol=1e-5)
        naive = torch.log_softmax(model(ids.unsqueeze(0)).logits[0].float(), -1)
    naive_lp = naive[7:-1].gather(-1, ids[8:, None])[:, 0]
    assert (naive_lp - lp_a[8:]).abs().max() > 1e-3


def test_gradients_match_unpacked(model):
    seqs, ids, cu = make_packed([6, 3, 8], seed=2)
    model.zero_grad()
    lp, _ = packed_logprobs(model, ids, cu)
    lp.sum().backward()
    packed_grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    for s in seqs:
        logp = torch.log_softmax(model(s.unsqueeze(0)).logits[0].float(), -1)
        logp[:-1].gather(-1, s[1:, None]).sum().backward()
    torch.testing.assert_close(packed_grad, model.model.layers[0].self_attn.q_proj.weight.grad, rtol=1e-4, atol=1e-6)
    model.zero_grad()


def test_chunked_head_matches_full_head_values_and_grads():
    torch.manual_seed(0)
    head = nn.Linear(8, 50, bias=True)
    hidden = torch.randn(23, 8, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    full_p, full_e = head_logprobs(hidden, head, targets, temperature=0.5, with_entropy=True, chunk=1000)
    (full_p.sum() + full_e.sum()).backward()
    g_full, gw_full = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    p, e = head_logprobs(hidden, head, targets, temperature=0.5, with_entropy=True, chunk=4)
    (p.sum() + e.sum()).backward()
    torch.testing.assert_close(p, full_p)
    torch.testing.assert_close(e, full_e)
    torch.testing.assert_close(hidden.grad, g_full)
    torch.testing.assert_close(head.weight.grad, gw_full)
    expected = torch.log_softmax(head(hidden.detach()) / 0.5, -1).gather(-1, targets[:, None])[:, 0]
    torch.testing.assert_close(p.detach(), expected)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_head_gradients_equal_autograd_through_log_softmax(temperature):
    torch.manual_seed(0)
    head = nn.Linear(8, 50, bias=True).double()
    hidden = torch.randn(23, 8, dtype=torch.double, requires_grad=True)
    targets, weights = torch.randint(0, 50, (23,)), torch.randn(23, dtype=torch.double)
    p, e = head_logprobs(hidden, head, targets, temperature=temperature, with_entropy=True, chunk=5)
    logp = torch.log_softmax(head(hidden) / temperature, -1)
    ref = logp.gather(-1, targets[:, None])[:, 0]
    assert p.dtype == e.dtype == torch.float32  # the logprob convention, whatever the model dtype
    torch.testing.assert_close(e, -(logp.exp() * logp).sum(-1).detach().float(), rtol=0, atol=1e-5)
    assert not e.requires_grad  # reported, never trained on
    params = [hidden, head.weight, head.bias]
    for got, want in zip(torch.autograd.grad((p * weights).sum(), params),
                         torch.autograd.grad((ref * weights).sum(), params)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_bf16_model_is_close_to_fp32(model):
    _, ids, cu = make_packed(LENGTHS, seed=3)
    with torch.no_grad():
        lp32, _ = packed_logprobs(model, ids, cu)
        lp16, _ = packed_logprobs(tiny_model(seed=0).to(torch.bfloat16).eval(), ids, cu)
    assert lp16.dtype == torch.float32
    assert (lp16 - lp32).abs().max() < 0.1
    assert not torch.equal(lp16, lp32)


def test_bad_packed_inputs_are_named(model):
    ids = torch.arange(6)
    with pytest.raises(ValueError, match="cu_seqlens.*end at len\\(input_ids\\)=6"):
        packed_logprobs(model, ids, torch.tensor([0, 3, 5]))
    with pytest.raises(ValueError, match="cu_seqlens.*at least one token"):
        packed_logprobs(model, ids, torch.tensor([0, 3, 3, 6]))
    with pytest.raises(ValueError, match="input_ids.*1D"):
        packed_logprobs(model, ids.view(2, 3), torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="temperature"):
        packed_logprobs(model, ids, torch.tensor([0, 6]), temperature=0.0)


def test_only_computes_the_chosen_tokens_with_the_same_values_and_gradients():
    model = tiny_model(seed=2)
    _, ids, cu = make_packed([6, 9, 4], seed=4)
    only = torch.zeros(ids.numel(), dtype=torch.bool)
    only[[2, 3, 4, 6, 10, 14, 17, 18]] = True  # 6 and 15 start sequences: they stay 0
    weights = torch.randn(ids.numel(), generator=torch.Generator().manual_seed(0))
    grads = []
    for kw in ({}, {"only": only}):
        model.zero_grad()
        lp, ent = packed_logprobs(model, ids, cu, with_entropy=True, **kw)
        (torch.where(only, lp, 0.0) * weights).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        if kw:
            picked = only & (lp != 0)
            assert (lp[~only] == 0).all() and (ent[~only] == 0).all() and lp[6] == 0
            assert picked.sum() == only.sum() - 1  # every chosen token but the sequence start
            torch.testing.assert_close(lp[only], full_lp[only], rtol=0, atol=1e-6)
            torch.testing.assert_close(ent[only], full_ent[only], rtol=0, atol=1e-5)
        else:
            full_lp, full_ent = lp.detach(), ent
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # fp32 vocabulary sums: kernels differ by CPU
    with pytest.raises(ValueError, match="only"):
        packed_logprobs(model, ids, cu, only=only[:-1])
