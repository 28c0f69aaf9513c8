"""Fused residual + LayerNorm (+ dropout): every backend against the float64 reference.

Method (DESIGN.md): fresh random inputs, float64 reference, the kernel's error at most 2x plain
PyTorch's error in the same dtype, outputs and all four gradients, awkward shapes, dropout
statistics and mask identity. Triton runs in the interpreter on CPU (small shapes).
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import roberta_fast
from roberta_fast import ops
from roberta_fast.nn import (FastBertOutput, FastRobertaOutput, FastRobertaSelfOutput,
                             FusedResidualLayerNorm)
from roberta_fast.ops import layer_norm_residual as lnr_op
from roberta_fast.reference.layer_norm_residual import forward_native
from tests.helpers import DTYPES, assert_close, binomial_bound, noncontiguous, randn, rel_err

HAS_CUDA = torch.cuda.is_available()
BACKENDS = ["cpu", "triton", "reference"]
EPS = 1e-5


def _device_for(backend, request):
    if backend == "triton":
        return request.getfixturevalue("triton_device")
    if backend == "cuda":
        return "cuda"
    return "cpu"


def _inputs(rows, hidden, dtype, device, *, param_dtype=None, lead=()):
    shape = (*lead, rows, hidden) if lead else (rows, hidden)
    x = randn(*shape, dtype=dtype, device=device, requires_grad=True)
    r = randn(*shape, dtype=dtype, device=device, requires_grad=True)
    pd = param_dtype or dtype
    w = (1.0 + 0.5 * torch.randn(hidden, device=device)).to(pd).requires_grad_()
    b = (0.5 * torch.randn(hidden, device=device)).to(pd).requires_grad_()
    return x, r, w, b


def _grads(y, tensors, dy):
    return torch.autograd.grad(y, tensors, dy)


def _reference64(x, r, w, b, dy, mask=None, p=0.0):
    """float64 output and gradients of (x, residual, weight, bias)."""
    leaves = [t.detach().double().requires_grad_() for t in (x, r, w, b)]
    y = forward_native(*leaves, EPS, mask, p)
    return y, _grads(y, leaves, dy.double())


def _baseline(x, r, w, b, dy):
    """Plain PyTorch in the inputs' dtype: layer_norm(x + r)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, r, w, b)]
    y = F.layer_norm(leaves[0] + leaves[1], (x.shape[-1],), leaves[2].to(x.dtype),
                     leaves[3].to(x.dtype), EPS)
    return y, _grads(y, leaves, dy)


def _check_against_reference(x, r, w, b, backend, **kwargs):
    dy = randn(*x.shape, dtype=x.dtype, device=x.device)
    with roberta_fast.use_backend(backend):
        y = ops.fused_residual_layer_norm(x, r, w, b, EPS, **kwargs)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    grads = _grads(y, (x, r, w, b), dy)
    ref_y, ref_grads = _reference64(x, r, w, b, dy)
    base_y, base_grads = _baseline(x, r, w, b, dy)
    errs = {"y": assert_close(y, ref_y, baseline=base_y, dtype=x.dtype, name="y")}
    for name, g, t, rg, bg in zip(("dx", "dresidual", "dweight", "dbias"), grads, (x, r, w, b),
                                  ref_grads, base_grads):
        assert g.shape == t.shape and g.dtype == t.dtype, name
        errs[name] = assert_close(g, rg, baseline=bg, dtype=x.dtype, name=name)
    return errs


# ----------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [33, 768, 1000, 1024])
@pytest.mark.parametrize("rows", [1, 7, 97])
def test_matches_float64_reference(backend, dtype, hidden, rows, request):
    device = _device_for(backend, request)
    x, r, w, b = _inputs(rows, hidden, dtype, device)
    _check_against_reference(x, r, w, b, backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_cpu_large_hidden(dtype):
    x, r, w, b = _inputs(5, 4096, dtype, "cpu")
    _check_against_reference(x, r, w, b, "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_params_with_half_inputs(backend, dtype, request):
    device = _device_for(backend, request)
    x, r, w, b = _inputs(7, 1000, dtype, device, param_dtype=torch.float32)
    dy = randn(7, 1000, dtype=dtype, device=device)
    with roberta_fast.use_backend(backend):
        y = ops.fused_residual_layer_norm(x, r, w, b, EPS)
    grads = _grads(y, (x, r, w, b), dy)
    assert grads[2].dtype == torch.float32 and grads[3].dtype == torch.float32
    ref_y, ref_grads = _reference64(x, r, w, b, dy)
    assert_close(y, ref_y, dtype=dtype)
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_noncontiguous_and_3d_inputs(backend, dtype, request):
    device = _device_for(backend, request)
    x, r, w, b = _inputs(5, 33, dtype, device, lead=(3,))
    x_nc, r_nc = noncontiguous(x.detach()).requires_grad_(), noncontiguous(r.detach())
    r_nc.requires_grad_()
    w_nc = noncontiguous(w.detach()).requires_grad_()
    _check_against_reference(x_nc, r_nc, w_nc, b, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_zero_rows(backend, dtype, request):
    device = _device_for(backend, request)
    x, r, w, b = _inputs(0, 768, dtype, device, lead=(2,))
    with roberta_fast.use_backend(backend):
        y = ops.fused_residual_layer_norm(x, r, w, b, dropout_p=0.1, training=True)
    assert y.shape == (2, 0, 768)
    dx, dr, dw, db = _grads(y, (x, r, w, b), torch.empty_like(y))
    assert dx.shape == x.shape and dr.shape == r.shape
    assert torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros_like(b))


def test_reference_is_layer_norm_of_sum():
    x, r, w, b = (t.detach().double() for t in _inputs(7, 33, torch.float64, "cpu"))
    mask = torch.rand(7, 33) > 0.3
    want = F.layer_norm(x * mask / 0.7 + r, (33,), w, b, EPS)
    assert torch.allclose(forward_native(x, r, w, b, EPS, mask, 0.3), want, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- dropout


def _low_level_fwd(backend):
    if backend == "triton":
        return torch.ops.roberta_fast.layer_norm_residual_triton_fwd
    return torch.ops.roberta_fast.layer_norm_residual_fwd


def _away_from_zero(shape, device, dtype=torch.float32):
    """Values with |v| >= 0.5 so that a dropped element is unambiguous in the output."""
    v = torch.randn(*shape, device=device)
    return (torch.sign(v) * (0.5 + v.abs())).to(dtype)


def _recover_mask(y, x, r, w, b, mean, rstd, p):
    """The dropout mask the forward used, read back from its output and statistics."""
    s = ((y.double() - b.double()) / w.double()) / rstd.double()[:, None] + mean.double()[:, None]
    dropped_dist = (s - r.double()).abs()
    kept_dist = (s - r.double() - x.double() / (1.0 - p)).abs()
    return kept_dist < dropped_dist


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_dropout_same_mask_in_forward_and_backward(backend, request, monkeypatch):
    device = _device_for(backend, request)
    rows, hidden, p = 13, 1000, 0.3
    x = _away_from_zero((rows, hidden), device).requires_grad_()
    r = randn(rows, hidden, device=device, requires_grad=True)
    w = _away_from_zero((hidden,), device).requires_grad_()
    b = randn(hidden, device=device, requires_grad=True)
    seeds = []
    real_new_seed = lnr_op.new_seed

    def recording_new_seed(dev):
        seeds.append(real_new_seed(dev))
        return seeds[-1]

    monkeypatch.setattr(lnr_op, "new_seed", recording_new_seed)
    with roberta_fast.use_backend(backend):
        y = ops.fused_residual_layer_norm(x, r, w, b, EPS, dropout_p=p, training=True)
    assert len(seeds) == 1
    dy = randn(rows, hidden, device=device)
    grads = _grads(y, (x, r, w, b), dy)
    # mean/rstd of the same forward (same seed) to read the mask back from y.
    _, mean, rstd = _low_level_fwd(backend)(x.detach(), r.detach(), w.detach(), b.detach(), EPS,
                                           p, seeds[0])
    mask = _recover_mask(y.detach(), x.detach(), r.detach(), w.detach(), b.detach(), mean, rstd, p)
    ref_y, ref_grads = _reference64(x, r, w, b, dy, mask, p)
    assert_close(y, ref_y, dtype=torch.float32, name="y")
    for name, g, rg in zip(("dx", "dresidual", "dweight", "dbias"), grads, ref_grads):
        assert_close(g, rg, dtype=torch.float32, name=name)
    # The backward's dropped elements are exactly the forward's.
    assert torch.equal(grads[0] == 0, ~mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_kept_fraction(backend, request):
    device = _device_for(backend, request)
    rows, hidden = (64, 768) if backend != "triton" else (16, 768)
    p = 0.1 if backend == "reference" else 0.25
    x, r, w, b = _inputs(rows, hidden, torch.float32, device)
    with roberta_fast.use_backend(backend):
        y = ops.fused_residual_layer_norm(x, r, w, b, dropout_p=p, training=True)
    dx, dr = _grads(y, (x, r), randn(rows, hidden, device=device))
    kept = (dx != 0).double().mean().item()
    n = rows * hidden
    assert abs(kept - (1 - p)) <= binomial_bound(n, 1 - p), (kept, 1 - p)
    # Kept elements: dx = dresidual / (1 - p).
    k = dx != 0
    assert torch.allclose(dx[k], dr[k] / (1 - p), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_p0_and_eval_mode_are_exactly_no_dropout(backend, request):
    device = _device_for(backend, request)
    x, r, w, b = _inputs(7, 768, torch.float32, device)
    dy = randn(7, 768, device=device)
    with roberta_fast.use_backend(backend):
        plain = ops.fused_residual_layer_norm(x, r, w, b)
        p0 = ops.fused_residual_layer_norm(x, r, w, b, dropout_p=0.0, training=True)
        evaluated = ops.fused_residual_layer_norm(x, r, w, b, dropout_p=0.5, training=False)
    assert torch.equal(plain, p0) and torch.equal(plain, evaluated)
    g_plain, g_p0, g_eval = (_grads(y, (x, r, w, b), dy) for y in (plain, p0, evaluated))
    for a, c, e in zip(g_plain, g_p0, g_eval):
        assert torch.equal(a, c) and torch.equal(a, e)
    assert torch.equal(g_plain[0], g_plain[1])  # no dropout: d/dx == d/dresidual


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_masks_differ_between_calls(backend, request):
    device = _device_for(backend, request)
    x, r, w, b = _inputs(4, 256, torch.float32, device)
    dy = randn(4, 256, device=device)
    masks = []
    with roberta_fast.use_backend(backend):
        for _ in range(2):
            y = ops.fused_residual_layer_norm(x, r, w, b, dropout_p=0.5, training=True)
            masks.append(_grads(y, (x,), dy)[0] != 0)
    assert not torch.equal(masks[0], masks[1])


# 1000: rows start on a Philox counter and the Triton kernels share one call among four
# elements; 333: rows start mid-counter and each element draws its own. 33: rows shorter than
# one CPU vector of keep bits, starting at every position of a counter. bf16: the CPU kernels'
# half-precision path draws the same mask (values then agree to bf16 rounding only).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hidden", [1000, 333, 33])
def test_cpu_and_triton_draw_the_same_mask(triton_device, hidden, dtype):
    if triton_device != "cpu":
        pytest.skip("NOT RUN: compares on CPU tensors (see the gpu test for CUDA)")
    rows, p = 9, 0.4
    x = _away_from_zero((rows, hidden), "cpu", dtype)  # a dropped element is then exactly 0
    r, w, b = (t.detach() for t in _inputs(rows, hidden, dtype, "cpu")[1:])
    dy = _away_from_zero((rows, hidden), "cpu", dtype)
    seed = ops.layer_norm_residual.new_seed(torch.device("cpu"))
    tol_fwd, tol_bwd = (1e-6, 1e-5) if dtype == torch.float32 else (1e-2, 2e-2)
    cpu_out = torch.ops.roberta_fast.layer_norm_residual_fwd(x, r, w, b, EPS, p, seed)
    tri_out = torch.ops.roberta_fast.layer_norm_residual_triton_fwd(x, r, w, b, EPS, p, seed)
    for a, c in zip(cpu_out, tri_out):
        assert rel_err(a, c) < tol_fwd
    cpu_bwd = torch.ops.roberta_fast.layer_norm_residual_bwd(dy, x, r, w, *cpu_out[1:], p, seed)
    tri_bwd = torch.ops.roberta_fast.layer_norm_residual_triton_bwd(dy, x, r, w, *tri_out[1:], p,
                                                                    seed)
    dropped = cpu_bwd[1] == 0
    assert 0.2 < dropped.double().mean().item() < 0.6
    assert torch.equal(dropped, tri_bwd[1] == 0)
    for a, c in zip(cpu_bwd, tri_bwd):
        assert rel_err(a, c) < tol_bwd


# ----------------------------------------------------------------------------- modules


def _hf_config(kind, dropout):
    from transformers import BertConfig, RobertaConfig

    cls = RobertaConfig if kind == "roberta" else BertConfig
    return cls(hidden_size=48, intermediate_size=96, num_attention_heads=4,
               hidden_dropout_prob=dropout, layer_norm_eps=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,which", [("roberta", "self_output"), ("roberta", "output"),
                                        ("bert", "output")])
def test_drop_in_modules_match_hugging_face(kind, which, backend, request):
    from transformers.models.bert.modeling_bert import BertOutput
    from transformers.models.roberta.modeling_roberta import RobertaOutput, RobertaSelfOutput

    device = _device_for(backend, request)
    stock_cls, fast_cls = {
        ("roberta", "self_output"): (RobertaSelfOutput, FastRobertaSelfOutput),
        ("roberta", "output"): (RobertaOutput, FastRobertaOutput),
        ("bert", "output"): (BertOutput, FastBertOutput),
    }[(kind, which)]
    config = _hf_config(kind, dropout=0.1)
    stock = stock_cls(config).to(device).eval()
    with torch.no_grad():  # non-trivial LayerNorm parameters
        stock.LayerNorm.weight.add_(0.3 * torch.randn_like(stock.LayerNorm.weight))
        stock.LayerNorm.bias.add_(0.3 * torch.randn_like(stock.LayerNorm.bias))
    fast = fast_cls.convert(copy.deepcopy(stock))
    assert type(fast) is fast_cls and isinstance(fast, stock_cls)
    assert list(fast.state_dict()) == list(stock.state_dict())
    in_features = stock.dense.in_features
    h = randn(2, 5, in_features, device=device, requires_grad=True)
    res = randn(2, 5, 48, device=device, requires_grad=True)
    dy = randn(2, 5, 48, device=device)
    want = stock(h, res)
    with roberta_fast.use_backend(backend):
        got = fast(h, res)
    want_grads = _grads(want, (h, res, *stock.parameters()), dy)
    got_grads = _grads(got, (h, res, *fast.parameters()), dy)
    assert rel_err(got, want) < 1e-5
    for g, wg in zip(got_grads, want_grads):
        assert rel_err(g, wg) < 1e-5


def test_convert_keeps_parameters_and_refuses_other_modules():
    from transformers.models.roberta.modeling_roberta import RobertaOutput

    stock = RobertaOutput(_hf_config("roberta", 0.1))
    params = dict(stock.named_parameters())
    fast = FastRobertaOutput.convert(stock)
    assert fast is stock and isinstance(fast, FastRobertaOutput)
    assert all(p is params[n] for n, p in fast.named_parameters())
    assert FastRobertaOutput.convert(fast) is fast
    with pytest.raises(TypeError, match="RobertaSelfOutput"):
        FastRobertaSelfOutput.convert(torch.nn.Linear(2, 2))


def test_fused_layer_norm_module_is_a_layer_norm():
    m = FusedResidualLayerNorm(33, eps=1e-6)
    assert set(m.state_dict()) == set(torch.nn.LayerNorm(33).state_dict())
    x, r = randn(4, 33), randn(4, 33)
    with torch.no_grad():
        m.weight.normal_()
    m.eval()
    assert rel_err(m(x, r, dropout_p=0.5), F.layer_norm(x + r, (33,), m.weight, m.bias, 1e-6)) \
        < 1e-6
    m.train()
    y = m(x.requires_grad_(), r, dropout_p=0.5)
    assert not torch.equal(y, m.eval()(x, r))


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    x, r, w, b = (t.detach() for t in _inputs(3, 8, torch.float32, "cpu"))
    f = ops.fused_residual_layer_norm
    with pytest.raises(ValueError, match="residual shape"):
        f(x, r[:, :4], w, b)
    with pytest.raises(ValueError, match="weight must have shape"):
        f(x, r, w[:4], b)
    with pytest.raises(ValueError, match="bias must have shape"):
        f(x, r, w, b[:4])
    with pytest.raises(TypeError, match="dtype"):
        f(x.long(), r.long(), w, b)
    with pytest.raises(TypeError, match="dtype"):
        f(x, r.half(), w, b)
    with pytest.raises(TypeError, match="weight/bias"):
        f(x, r, w.half(), b.half())
    with pytest.raises(ValueError, match="device"):
        f(x, r, w.to("meta"), b)
    with pytest.raises(ValueError, match="dropout_p"):
        f(x, r, w, b, dropout_p=1.0, training=True)
    with pytest.raises(ValueError, match="dropout_p"):
        f(x, r, w, b, dropout_p=-0.1)
    with pytest.raises(ValueError, match="eps"):
        f(x, r, w, b, eps=0.0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        f(x.tolist(), r, w, b)


def test_native_op_checks_its_arguments():
    x, r, w, b = (t.detach() for t in _inputs(3, 8, torch.float32, "cpu"))
    fwd = torch.ops.roberta_fast.layer_norm_residual_fwd
    with pytest.raises(ValueError, match="seed"):
        fwd(x, r, w, b, EPS, 0.5, None)
    with pytest.raises(ValueError, match="2-D"):
        fwd(x[0], r[0], w, b, EPS, 0.0, None)
    with pytest.raises(ValueError, match="contiguous"):
        fwd(x.t(), r.t(), torch.ones(3), torch.zeros(3), EPS, 0.0, None)
    with pytest.raises(TypeError, match="int64"):
        fwd(x, r, w, b, EPS, 0.5, torch.zeros(1))


# ----------------------------------------------------------------------------- torch.library


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_opcheck_native_ops(p):
    x, r, w, b = (t.detach() for t in _inputs(5, 40, torch.float32, "cpu"))
    seed = ops.layer_norm_residual.new_seed(torch.device("cpu")) if p else None
    for t in (x, r, w, b):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.roberta_fast.layer_norm_residual_fwd.default,
                          (x, r, w, b, EPS, p, seed))
    y, mean, rstd = torch.ops.roberta_fast.layer_norm_residual_fwd(x.detach(), r.detach(),
                                                                   w.detach(), b.detach(), EPS, p,
                                                                   seed)
    torch.library.opcheck(torch.ops.roberta_fast.layer_norm_residual_bwd.default,
                          (randn(5, 40), x.detach(), r.detach(), w.detach(), mean, rstd, p, seed))


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_opcheck_triton_ops(p, triton_device):
    x, r, w, b = (t.detach() for t in _inputs(3, 24, torch.float32, triton_device))
    seed = ops.layer_norm_residual.new_seed(torch.device(triton_device)) if p else None
    for t in (x, r, w, b):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.roberta_fast.layer_norm_residual_triton_fwd.default,
                          (x, r, w, b, EPS, p, seed))
    y, mean, rstd = torch.ops.roberta_fast.layer_norm_residual_triton_fwd(
        x.detach(), r.detach(), w.detach(), b.detach(), EPS, p, seed)
    torch.library.opcheck(torch.ops.roberta_fast.layer_norm_residual_triton_bwd.default,
                          (randn(3, 24, device=triton_device), x.detach(), r.detach(), w.detach(),
                           mean, rstd, p, seed))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_torch_compile_has_no_graph_break(backend, request):
    device = _device_for(backend, request)
    torch._dynamo.reset()
    m = FusedResidualLayerNorm(64).to(device)
    with roberta_fast.use_backend(backend):
        compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
        x, r = randn(2, 3, 64, device=device, requires_grad=True), randn(2, 3, 64, device=device)
        m.eval()
        y = compiled(x, r, 0.1)
        want = F.layer_norm(x + r, (64,), m.weight, m.bias, m.eps)
        assert rel_err(y, want) < 1e-5
        m.train()
        y = compiled(x, r, 0.1)
        (dx,) = _grads(y, (x,), torch.ones_like(y))
        assert torch.isfinite(dx).all() and (dx == 0).any()  # dropout ran inside the graph


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,hidden", [(16384, 768), (1, 33), (97, 1000), (513, 1024),
                                         (7, 4096), (3, 8192)])
def test_gpu_matches_float64_reference(backend, dtype, rows, hidden):
    x, r, w, b = _inputs(rows, hidden, dtype, "cuda")
    _check_against_reference(x, r, w, b, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_dropout_statistics_and_mask_identity(backend, monkeypatch):
    rows, hidden, p = 4096, 768, 0.1
    x, r, w, b = _inputs(rows, hidden, torch.bfloat16, "cuda")
    with roberta_fast.use_backend(backend):
        y = ops.fused_residual_layer_norm(x, r, w, b, dropout_p=p, training=True)
    dx, dr = _grads(y, (x, r), randn(rows, hidden, dtype=torch.bfloat16, device="cuda"))
    kept = (dx != 0).double().mean().item()
    assert abs(kept - (1 - p)) <= binomial_bound(rows * hidden, 1 - p)


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [1000, 333])
def test_gpu_cuda_triton_cpu_draw_the_same_mask(hidden):
    rows, p = 257, 0.3
    x, r, w, b = (t.detach() for t in _inputs(rows, hidden, torch.float32, "cuda"))
    dy = randn(rows, hidden, device="cuda")
    seed = ops.layer_norm_residual.new_seed(torch.device("cuda"))
    masks = []
    for name, dev in (("cuda", "cuda"), ("triton", "cuda"), ("cpu", "cpu")):
        fwd = _low_level_fwd("triton" if name == "triton" else "cpu")
        bwd = (torch.ops.roberta_fast.layer_norm_residual_triton_bwd if name == "triton"
               else torch.ops.roberta_fast.layer_norm_residual_bwd)
        args = [t.to(dev) for t in (x, r, w, b)]
        _, mean, rstd = fwd(*args, EPS, p, seed.to(dev))
        dres, dx, _, _ = bwd(dy.to(dev), *args[:3], mean, rstd, p, seed.to(dev))
        masks.append((dx != 0).cpu())
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])


@pytest.mark.gpu
def test_gpu_torch_compile_inductor():
    torch._dynamo.reset()
    m = FusedResidualLayerNorm(768).cuda()
    compiled = torch.compile(m, fullgraph=True)
    x, r = randn(4, 97, 768, device="cuda", requires_grad=True), randn(4, 97, 768, device="cuda")
    m.eval()
    assert rel_err(compiled(x, r), F.layer_norm(x + r, (768,), m.weight, m.bias, m.eps)) < 1e-5



@pytest.mark.gpu
def test_gpu_triton_on_a_device_that_is_not_current():
    if torch.cuda.device_count() < 2:
        pytest.skip("NOT RUN: needs two CUDA devices")
    assert torch.cuda.current_device() == 0
    x, r, w, b = _inputs(97, 768, torch.bfloat16, "cuda:1")
    _check_against_reference(x, r, w, b, "triton")
    with roberta_fast.use_backend("triton"):
        y = ops.fused_residual_layer_norm(x, r, w, b, EPS, dropout_p=0.1, training=True)
    dx, = _grads(y, (x,), torch.ones_like(y))
    assert torch.isfinite(dx).all() and (dx == 0).any()
    assert torch.cuda.current_device() == 0
