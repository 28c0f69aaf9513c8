"""FastRobertaSelfAttention (and the BERT / XLM-R twins) against the stock Hugging Face module."""
import copy
import inspect

import pytest
import torch

pytest.importorskip("transformers")
from transformers import BertConfig, RobertaConfig, XLMRobertaConfig  # noqa: E402
try:
    from transformers.masking_utils import create_bidirectional_mask
except ImportError:  # transformers 4.x builds the 4-D masks with modeling_attn_mask_utils
    create_bidirectional_mask = None
from transformers.models.bert.modeling_bert import BertSelfAttention  # noqa: E402
from transformers.models.roberta.modeling_roberta import RobertaSelfAttention  # noqa: E402
from transformers.models.xlm_roberta.modeling_xlm_roberta import XLMRobertaSelfAttention  # noqa: E402

import roberta_fast.ops as ops  # noqa: E402
from roberta_fast.nn.attention import (  # noqa: E402
    FastBertSelfAttention,
    FastRobertaSelfAttention,
    FastXLMRobertaSelfAttention,
    _op,
    key_padding_mask_from_attention_mask,
)
from tests.helpers import assert_close, randn  # noqa: E402

FAMILIES = {
    "roberta": (RobertaConfig, RobertaSelfAttention, FastRobertaSelfAttention),
    "bert": (BertConfig, BertSelfAttention, FastBertSelfAttention),
    "xlm-roberta": (XLMRobertaConfig, XLMRobertaSelfAttention, FastXLMRobertaSelfAttention),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(family, impl, hidden=48, heads=4, dropout=0.0):
    cfg_cls = FAMILIES[family][0]
    cfg = cfg_cls(vocab_size=100, hidden_size=hidden, num_hidden_layers=1,
                  num_attention_heads=heads, intermediate_size=2 * hidden,
                  attention_probs_dropout_prob=dropout, hidden_dropout_prob=0.0)
    cfg._attn_implementation = impl
    return cfg


def _padding(batch, seqlen):
    """A [B, L] int mask with a full row, a length-1 row and random lengths."""
    lengths = torch.randint(1, seqlen + 1, (batch,))
    lengths[0] = seqlen
    lengths[-1] = 1
    return (torch.arange(seqlen)[None] < lengths[:, None]).long()


def _hf_mask(cfg, hidden, mask2d):
    """The mask the encoder of this transformers release hands its layers."""
    if create_bidirectional_mask is None:
        from transformers import modeling_attn_mask_utils as utils

        if cfg._attn_implementation == "sdpa":
            return utils._prepare_4d_attention_mask_for_sdpa(mask2d, hidden.dtype)
        return utils._prepare_4d_attention_mask(mask2d, hidden.dtype)
    # The embeddings argument is ``input_embeds`` before transformers 5.x's rename.
    params = inspect.signature(create_bidirectional_mask).parameters
    name = "inputs_embeds" if "inputs_embeds" in params else "input_embeds"
    return create_bidirectional_mask(config=cfg, attention_mask=mask2d, **{name: hidden})


def _assert_grads(got, ref, base):
    """assert_close per parameter; gradients that are exactly zero in exact arithmetic (the key
    bias, whose shift softmax cancels; the query weights when each row has one key) are judged by
    their size against the largest gradient instead of relatively."""
    scale = max(float(g.norm()) for g in ref.values())
    for name in ref:
        if float(ref[name].norm()) < 1e-7 * scale:
            err = float((got[name].double() - ref[name]).norm()) / scale
            assert err < 1e-6, f"grad {name}: {err:.3e} of the largest gradient, should be ~0"
        else:
            # A parameter gradient is a sum over every token, and the ratio of two such rounding
            # errors has a long tail: over 600 cases err / stock fp32 err had p99 2.06 and max
            # 2.26 (a bias), one CI run 2.55 (query.weight). Parameters get 3x, as in test_patch.
            assert_close(got[name], ref[name], baseline=base[name], name=f"grad {name}",
                         factor=3.0)


class _Counter:
    """Counts calls of an op while forwarding to it."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.fixture
def count_ops(monkeypatch):
    counters = {name: _Counter(_op(name)) for name in ("attention", "attention_varlen")}
    for name, counter in counters.items():
        monkeypatch.setattr(ops, name, counter, raising=False)
    return counters


def _run(module, hidden, mask, real, upstream):
    """Output at real positions and grads of the input and every parameter."""
    hidden = hidden.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out, _ = module(hidden, attention_mask=mask)
    (out * upstream * real[..., None]).sum().backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    return out * real[..., None], hidden.grad, grads


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("batch,seqlen,hidden_size,heads", [(3, 7, 48, 4), (4, 13, 32, 2),
                                                             (2, 1, 32, 4)])
def test_matches_stock(family, impl, batch, seqlen, hidden_size, heads, count_ops):
    cfg = _config(family, impl, hidden_size, heads)
    stock = FAMILIES[family][1](cfg).eval()
    fast = FAMILIES[family][2].convert(copy.deepcopy(stock))
    ref = copy.deepcopy(stock).double()

    mask2d = _padding(batch, seqlen)
    real = mask2d.bool()
    hidden = randn(batch, seqlen, hidden_size)
    upstream = randn(batch, seqlen, hidden_size)

    cfg64 = copy.deepcopy(cfg)
    out_ref, gx_ref, g_ref = _run(ref, hidden.double(), _hf_mask(cfg64, hidden.double(), mask2d),
                                  real, upstream.double())
    out_base, gx_base, g_base = _run(stock, hidden, _hf_mask(cfg, hidden, mask2d), real, upstream)
    calls = count_ops["attention"].calls
    # The fast module gets what the patched base model hands its layers: the 2-D bool mask.
    out, gx, g = _run(fast, hidden, real, real, upstream)
    assert count_ops["attention"].calls == calls + 1, "the fast path did not run"

    assert_close(out, out_ref, baseline=out_base, name="output")
    assert_close(gx, gx_ref, baseline=gx_base, name="grad hidden")
    _assert_grads(g, g_ref, g_base)


@pytest.mark.parametrize("family", ["roberta", "bert"])
def test_mask_forms(family, count_ops):
    """2-D bool and integer masks and None give the stock result on the fast path; a padding mask
    already expanded to 4-D is not read on the device, so it takes the stock path."""
    cfg = _config(family, "eager")
    stock = FAMILIES[family][1](cfg).eval()
    fast = FAMILIES[family][2].convert(copy.deepcopy(stock))
    batch, seqlen = 3, 9
    mask2d = _padding(batch, seqlen)
    hidden = randn(batch, seqlen, cfg.hidden_size)
    real = mask2d.bool()[..., None]
    mask4d = _hf_mask(cfg, hidden, mask2d)
    with torch.no_grad():
        want = stock(hidden, attention_mask=mask4d)[0] * real
        for given in (mask2d.bool(), mask2d):
            got = fast(hidden, attention_mask=given)[0] * real
            assert_close(got, want, name="2-D mask")
        assert_close(fast(hidden)[0], stock(hidden)[0], name="no mask")
        assert count_ops["attention"].calls == 3
        assert_close(fast(hidden, attention_mask=mask4d)[0] * real, want, name="4-D mask")
    assert count_ops["attention"].calls == 3


def test_key_padding_mask_derivation():
    """Only masks that are key-padding masks by their form are taken; none is read."""
    cfg = _config("roberta", "eager")
    batch, seqlen = 3, 6
    mask2d = _padding(batch, seqlen)
    hidden = randn(batch, seqlen, cfg.hidden_size)
    assert key_padding_mask_from_attention_mask(None, batch, seqlen) == (True, None)
    ok, kpm = key_padding_mask_from_attention_mask(mask2d.bool(), batch, seqlen)
    assert ok and kpm is not None and torch.equal(kpm, mask2d.bool())
    ok, kpm = key_padding_mask_from_attention_mask(mask2d, batch, seqlen)
    assert ok and torch.equal(kpm, mask2d.bool())
    for impl in ("eager", "sdpa"):  # stock's expanded 4-D masks
        cfg._attn_implementation = impl
        full = torch.ones(batch, seqlen, dtype=torch.long)
        for m in (mask2d, full):
            expanded = _hf_mask(cfg, hidden, m)
            if expanded is not None:
                got = key_padding_mask_from_attention_mask(expanded, batch, seqlen)
                assert got == (False, None)
    causal = torch.tril(torch.ones(seqlen, seqlen, dtype=torch.bool))[None, None]
    assert key_padding_mask_from_attention_mask(causal, batch, seqlen) == (False, None)
    assert key_padding_mask_from_attention_mask(mask2d[:, :-1], batch, seqlen) == (False, None)
    assert key_padding_mask_from_attention_mask(mask2d.float(), batch, seqlen) == (False, None)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_stock_fallback_takes_the_2d_mask(impl, count_ops):
    """When the stock forward runs on a 2-D key-padding mask (attention probabilities asked
    for), it gets the additive bias its implementation expects: the stock result."""
    cfg = _config("roberta", impl)
    stock = RobertaSelfAttention(cfg).eval()
    fast = FastRobertaSelfAttention.convert(copy.deepcopy(stock))
    hidden = randn(3, 7, cfg.hidden_size)
    mask2d = _padding(3, 7)
    real = mask2d.bool()[..., None]
    with torch.no_grad():
        want = stock(hidden, attention_mask=_hf_mask(cfg, hidden, mask2d))[0]
        got = fast(hidden, attention_mask=mask2d.bool(), output_attentions=True)[0]
    assert_close(got * real, want * real, name="fallback output")
    assert count_ops["attention"].calls == 0


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_non_padding_masks_fall_back_to_stock(impl, count_ops):
    cfg = _config("roberta", impl)
    stock = RobertaSelfAttention(cfg).eval()
    fast = FastRobertaSelfAttention.convert(copy.deepcopy(stock))
    batch, seqlen = 2, 5
    hidden = randn(batch, seqlen, cfg.hidden_size)
    causal = torch.tril(torch.ones(seqlen, seqlen, dtype=torch.bool))[None, None].expand(
        batch, 1, seqlen, seqlen)
    masks = [causal, torch.where(causal, 0.0, torch.finfo(torch.float32).min)]
    if impl == "eager":
        masks.append(randn(batch, 1, seqlen, seqlen))  # an additive bias
    with torch.no_grad():
        for mask in masks:
            assert_close(fast(hidden, attention_mask=mask)[0], stock(hidden, attention_mask=mask)[0],
                         name="fallback")
    assert count_ops["attention"].calls == 0


def test_output_attentions_takes_stock_path(count_ops):
    cfg = _config("roberta", "eager")
    stock = RobertaSelfAttention(cfg).eval()
    fast = FastRobertaSelfAttention.convert(copy.deepcopy(stock))
    hidden = randn(2, 5, cfg.hidden_size)
    mask2d = _padding(2, 5)
    mask = _hf_mask(cfg, hidden, mask2d)
    with torch.no_grad():
        out, probs = fast(hidden, attention_mask=mask2d.bool(), output_attentions=True)
        want, want_probs = stock(hidden, attention_mask=mask, output_attentions=True)
    assert probs is not None and probs.shape == (2, cfg.num_attention_heads, 5, 5)
    assert_close(probs, want_probs, name="probs")
    assert_close(out, want, name="output")
    assert count_ops["attention"].calls == 0


def test_packed_sequences_match_per_sequence_stock(count_ops):
    cfg = _config("roberta", "eager")
    stock = RobertaSelfAttention(cfg).eval()
    fast = FastRobertaSelfAttention.convert(copy.deepcopy(stock))
    lengths = [5, 1, 8, 3]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    hidden = randn(1, sum(lengths), cfg.hidden_size, requires_grad=True)
    out, _ = fast(hidden, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=8, max_length_k=8)
    pieces = [stock(hidden[:, cu[i]:cu[i + 1]])[0] for i in range(len(lengths))]
    want = torch.cat(pieces, dim=1)
    assert count_ops["attention_varlen"].calls == 1
    assert_close(out, want, name="packed output")
    upstream = randn(*out.shape)
    g, = torch.autograd.grad((out * upstream).sum(), hidden)
    g_want, = torch.autograd.grad((want * upstream).sum(), hidden)
    assert_close(g, g_want, name="packed grad")
    with pytest.raises(ValueError, match="attention_mask must be None"):
        fast(hidden, attention_mask=torch.ones(1, hidden.shape[1]), cu_seq_lens_q=cu)


def test_dropout_in_training_is_random_and_finite():
    cfg = _config("roberta", "sdpa", dropout=0.5)
    fast = FastRobertaSelfAttention.convert(RobertaSelfAttention(cfg)).train()
    hidden = randn(2, 9, cfg.hidden_size, requires_grad=True)
    a, _ = fast(hidden)
    b, _ = fast(hidden)
    assert torch.isfinite(a).all() and not torch.equal(a, b)
    a.sum().backward()
    assert torch.isfinite(hidden.grad).all()
    fast.eval()
    with torch.no_grad():
        assert torch.equal(fast(hidden)[0], fast(hidden)[0])


def test_packed_dropout_rows_start_on_philox_counters(count_ops, monkeypatch):
    """In training the packed path passes max_seqlen rounded up to a multiple of 4 (rows of
    dropout offsets on Philox counter boundaries: the GPU kernels' grouped draw); evaluation
    passes it as given. The result is the op's, called with the rounded length."""
    seen = []
    counter = count_ops["attention_varlen"]
    inner = counter.fn
    counter.fn = lambda q, k, v, cu, max_seqlen, **kw: (seen.append(max_seqlen),
                                                        inner(q, k, v, cu, max_seqlen, **kw))[1]
    cfg = _config("roberta", "sdpa", dropout=0.3)
    fast = FastRobertaSelfAttention.convert(RobertaSelfAttention(cfg))
    lengths = [5, 1, 7, 3]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    hidden = randn(1, sum(lengths), cfg.hidden_size)
    kw = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=7)
    seed = torch.seed()
    fast.train()(hidden, **kw)
    fast.eval()(hidden, **kw)
    assert seen == [8, 7]
    torch.manual_seed(seed)
    heads, head_dim = fast.num_attention_heads, fast.attention_head_size
    x = hidden.reshape(-1, cfg.hidden_size)
    q, k, v = (lin(x).view(-1, heads, head_dim) for lin in (fast.query, fast.key, fast.value))
    want = inner(q, k, v, cu, 8, dropout_p=0.3, scale=head_dim ** -0.5)
    torch.manual_seed(seed)
    got, _ = fast.train()(hidden, **kw)
    torch.testing.assert_close(got.view(-1, heads, head_dim), want)


def test_convert_keeps_identity_and_reverts():
    cfg = _config("roberta", "eager")
    module = RobertaSelfAttention(cfg)
    params = {n: p for n, p in module.named_parameters()}
    keys = list(module.state_dict())
    FastRobertaSelfAttention.convert(module)
    assert type(module) is FastRobertaSelfAttention and isinstance(module, RobertaSelfAttention)
    assert list(module.state_dict()) == keys
    assert all(p is params[n] for n, p in module.named_parameters())
    FastRobertaSelfAttention.convert(module)  # converting twice is harmless
    FastRobertaSelfAttention.revert(module)
    assert type(module) is RobertaSelfAttention


def test_convert_rejects_other_modules():
    with pytest.raises(TypeError, match="RobertaSelfAttention"):
        FastRobertaSelfAttention.convert(torch.nn.Linear(2, 2))
    bert = BertSelfAttention(_config("bert", "eager"))
    with pytest.raises(TypeError, match="BertSelfAttention"):
        FastRobertaSelfAttention.convert(bert)
    assert type(bert) is BertSelfAttention


# --------------------------------------------------------------------------------------------
# The fused q/k/v projection
# --------------------------------------------------------------------------------------------

def _three(module, x, heads):
    shape = (*x.shape[:-1], heads, -1)
    return [lin(x).view(shape) for lin in (module.query, module.key, module.value)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_projection_matches_three_linears_and_their_gradients(dtype):
    from roberta_fast.nn.attention import project_qkv

    cfg = _config("roberta", "sdpa", hidden=64, heads=4)
    module = RobertaSelfAttention(cfg).to(dtype)
    exact = copy.deepcopy(module).double()
    x = randn(3, 7, 64, dtype=dtype, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    grads = [randn(3, 7, 4, 16, dtype=dtype) for _ in range(3)]

    def run(mod, inp, outs):
        params = [p for lin in (mod.query, mod.key, mod.value) for p in lin.parameters()]
        return outs, torch.autograd.grad(outs, [inp, *params], [g.to(inp.dtype) for g in grads])

    fused = run(module, x, project_qkv(module, x, 4, 16))
    stock = run(module, x, _three(module, x, 4))
    ref = run(exact, x64, _three(exact, x64, 4))
    for i, (g, b, r) in enumerate(zip([*fused[0], *fused[1]], [*stock[0], *stock[1]],
                                      [*ref[0], *ref[1]])):
        assert g.shape == r.shape
        assert_close(g, r, baseline=b, name=f"output/gradient {i}")


def test_fused_projection_cache_follows_parameter_changes():
    from roberta_fast.nn.attention import _QKV_CACHE, project_qkv

    cfg = _config("roberta", "sdpa", hidden=32, heads=2)
    module = RobertaSelfAttention(cfg)
    x = randn(2, 5, 32)

    def check():
        with torch.no_grad():
            want = _three(module, x, 2)
        with torch.inference_mode():
            got = project_qkv(module, x, 2, 16)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)

    check()
    assert module in _QKV_CACHE  # no-grad forwards keep the concatenated weight
    with torch.no_grad():  # an optimizer step: in place, the version counters move
        module.key.weight.add_(1.0)
        module.value.bias.mul_(-2.0)
    check()
    module.load_state_dict({k: torch.randn_like(v) for k, v in module.state_dict().items()})
    check()
    module.to(torch.float64)  # new storage
    x = x.double()
    check()
    assert "_QKV_CACHE" not in str(module.state_dict().keys())
    copy.deepcopy(module)  # the cache lives beside the module, never in it


def test_fused_projection_after_inference_mode_trains():
    """A weight cached under inference_mode is an inference tensor: a training forward must not
    save it for backward."""
    from roberta_fast.nn.attention import project_qkv

    cfg = _config("roberta", "sdpa", hidden=32, heads=2)
    module = RobertaSelfAttention(cfg)
    x = randn(2, 5, 32, requires_grad=True)
    with torch.inference_mode():
        project_qkv(module, x.detach(), 2, 16)
    q, k, v = project_qkv(module, x, 2, 16)
    (q.sum() + k.sum() + v.sum()).backward()
    assert module.query.weight.grad is not None and x.grad is not None


def test_fused_projection_under_autocast_caches_the_autocast_dtype():
    from roberta_fast.nn.attention import _QKV_CACHE, project_qkv

    cfg = _config("roberta", "sdpa", hidden=32, heads=2)
    module = RobertaSelfAttention(cfg)
    x = randn(2, 5, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = _three(module, x, 2)
        got = project_qkv(module, x, 2, 16)
    assert _QKV_CACHE[module][1].dtype == torch.bfloat16
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.bfloat16
        torch.testing.assert_close(g, w)
