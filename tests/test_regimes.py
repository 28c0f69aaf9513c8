"""Patched models wherever stock ones run: autocast, half-precision weights, inference_mode and
no_grad, torch.compile with fullgraph, and a forward + backward that never waits for the device.

Half precision is judged as tests/helpers.assert_close judges kernels: the stock model and the
patched one run in the same regime, both are compared with the stock model in float64, and the
patched error may be at most twice stock's (three times for parameter gradients, sums whose
order differs) plus a floor of the half dtype's rounding.
"""
from __future__ import annotations

import contextlib
import copy
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")

import roberta_fast  # noqa: E402
import roberta_fast.nn.masked_lm_loss as nn_mlm  # noqa: E402
from tests.hf import (FAMILIES, HEADS, OPTION_SETS, UNPAD_SUPPORTED, batch_for,  # noqa: E402
                      compare, make_batch, make_model, needs, patch, real_positions,
                      skip_if_stock_fails, stock_and_patched)
from tests.helpers import rel_err  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# Floors of the half-precision comparisons: the unit roundoff of the dtype for outputs, losses and
# gradients (relative), and for parameter gradients the same as a fraction of the largest
# gradient: the smallest gradients are sums that cancel (as in float32; see tests.hf.compare), and
# in half precision a few-element one such as the classifier bias's (the mean of probabilities
# minus one-hot) carries the rounding of its terms, which are of the largest gradient's size.
# With a tenth of it, the fp16 classifier bias of the unpadded model failed 1 run in 40 at 3.8x
# stock's error (stock: 3.6 ulps of the sum), no other case in 160.
HALF_TOL = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def half_compare(stock, fast, batch, dtype, *, regime=contextlib.nullcontext, **kwargs):
    """``tests.hf.compare`` with the floors of ``dtype``."""
    tol = HALF_TOL[dtype]
    return compare(stock, fast, batch, tol=tol, grad_floor=tol, regime=regime, **kwargs)


def autocast(device: str, dtype: torch.dtype):
    return lambda: torch.autocast(device, dtype=dtype)


def mlm_checks_logits(head: str, options: dict) -> bool:
    # With labels, the fused MLM loss returns the logits of the masked positions only.
    return not (head == "ForMaskedLM" and options.get("mlm_loss", True))


# ---------------------------------------------------------------------------------------------
# Mixed precision
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("option_set", list(OPTION_SETS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cpu_autocast_matches_stock(family, head, option_set, dtype):
    """Every head, family and option under ``torch.autocast("cpu", dtype)``: loss, outputs at
    real positions and every parameter gradient (in the parameters' float32) against stock under
    the same autocast. (fp16 without a loss scale: the tiny models' gradients stay in range.)"""
    options = OPTION_SETS[option_set]
    needs(options, family, head)
    stock, fast = stock_and_patched(family, head, options)
    batch = batch_for(head)
    skip_if_stock_fails(stock, batch)
    _, out = half_compare(stock, fast, batch, dtype, regime=autocast("cpu", dtype),
                          check_logits=mlm_checks_logits(head, options))
    if head == "ForMaskedLM":
        assert out.loss.dtype == torch.float32  # as CrossEntropyLoss under autocast
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in fast.parameters())


def test_cpu_autocast_masked_lm_training_steps():
    """The reported failure: a patched ForMaskedLM trains under CPU autocast (AdamW steps, with
    dropout), its loss finite and falling."""
    model = patch(make_model("roberta", "ForMaskedLM", dropout=0.1).train())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = make_batch("ForMaskedLM", batch=4, seqlen=13)
    losses = []
    for _ in range(8):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert all(loss == loss and abs(loss) < float("inf") for loss in losses)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("unpad", [False, True])
def test_triton_kernels_under_cpu_autocast(unpad, triton_device):
    """The Triton kernels (in the interpreter here) under autocast, every option, on a small
    model: the same agreement with stock as the CPU kernels."""
    if triton_device != "cpu":
        pytest.skip("NOT RUN: the interpreter run is for machines without a GPU")
    options = dict(unpad=unpad)
    needs(options)
    stock, fast = stock_and_patched("roberta", "ForMaskedLM", options)
    batch = make_batch("ForMaskedLM", batch=2, seqlen=7)
    with roberta_fast.use_backend("triton"):
        half_compare(stock, fast, batch, torch.bfloat16, regime=autocast("cpu", torch.bfloat16),
                     check_logits=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head", ["ForMaskedLM", "ForSequenceClassification"])
@pytest.mark.parametrize("unpad", [False, True])
def test_half_precision_models_match_stock(dtype, head, unpad):
    """Whole models cast to bf16 / fp16 (``model.to(dtype)``), every op in that dtype."""
    options = dict(unpad=unpad)
    needs(options, "roberta", head)
    stock = make_model("roberta", head).eval().to(dtype)
    fast = patch(copy.deepcopy(stock), **options)
    half_compare(stock, fast, batch_for(head), dtype,
                 check_logits=mlm_checks_logits(head, options))
    assert all(p.grad.dtype == dtype for p in fast.parameters() if p.grad is not None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("unpad", [False, True])
def test_autocast_on_gpu_with_grad_scaler(dtype, unpad):
    """CUDA autocast, bf16 and fp16 (scaled loss, as a ``GradScaler`` does): the first step's
    loss and every gradient against stock in the same regime, then AdamW steps through a
    ``GradScaler`` stay finite and track stock's losses."""
    stock = make_model("roberta", "ForMaskedLM").cuda().train()
    fast = patch(copy.deepcopy(stock), unpad=unpad)
    batches = [{k: v.cuda() for k, v in make_batch("ForMaskedLM", batch=4, seqlen=33).items()}
               for _ in range(4)]
    scale = 2.0 ** 12 if dtype == torch.float16 else 1.0
    half_compare(stock, fast, batches[0], dtype, regime=autocast("cuda", dtype), loss_scale=scale,
                 check_logits=False)
    losses = {}
    for name, model in (("stock", stock), ("fast", fast)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
        losses[name] = []
        for batch in batches:
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=dtype):
                loss = model(**batch).loss
            assert loss.dtype == torch.float32
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses[name].append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses["fast"])))
    for got, want in zip(losses["fast"], losses["stock"]):
        assert abs(got - want) < 5e-2 * abs(want)


@pytest.mark.gpu
def test_fused_ops_follow_autocast_on_gpu():
    """Under CUDA autocast the fused LayerNorm returns fp32 (as ``F.layer_norm``) and the MLM loss
    computes its logits in the autocast dtype and returns an fp32 loss."""
    from roberta_fast import ops

    x = torch.randn(6, 32, device="cuda", dtype=torch.bfloat16)
    w, b = torch.ones(32, device="cuda"), torch.zeros(32, device="cuda")
    hidden = torch.randn(6, 32, device="cuda", requires_grad=True)
    weight = torch.randn(50, 32, device="cuda", requires_grad=True)
    bias = torch.zeros(50, device="cuda", requires_grad=True)
    labels = torch.randint(0, 50, (6,), device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        assert ops.fused_residual_layer_norm(x, x, w, b).dtype == torch.float32
        loss = ops.masked_lm_loss(hidden, weight, bias, labels)
        want = torch.nn.functional.cross_entropy(
            torch.nn.functional.linear(hidden, weight, bias), labels)
    assert loss.dtype == want.dtype == torch.float32
    assert abs(float(loss) - float(want)) < 1e-2 * abs(float(want))
    loss.backward()
    assert weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("option_set", list(OPTION_SETS))
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_inference_matches_stock(family, head, option_set, mode):
    """Every head, family and option under ``torch.inference_mode()`` and ``torch.no_grad()``:
    the loss and the outputs at real positions are stock's."""
    options = OPTION_SETS[option_set]
    needs(options, family, head)
    stock, fast = stock_and_patched(family, head, options)
    batch = batch_for(head)
    skip_if_stock_fails(stock, batch)
    ref = copy.deepcopy(stock).double()
    with getattr(torch, mode)():
        got, want, exact = fast(**batch), stock(**batch), ref(**batch)
    real = real_positions(batch)
    for key in ("loss", "last_hidden_state", "pooler_output", "logits", "start_logits",
                "end_logits"):
        a, b, r = (getattr(o, key, None) for o in (got, want, exact))
        if a is None or b is None or a.shape != b.shape:
            continue
        if mode == "inference_mode":
            assert a.is_inference()
        if a.dim() >= real.dim() and a.shape[:real.dim()] == real.shape:
            a, b, r = a[real], b[real], r[real]
        err, base = rel_err(a, r), rel_err(b, r)
        assert err < 2 * base + 1e-5, f"{key}: rel err {err:.2e} (stock fp32 {base:.2e})"


# ---------------------------------------------------------------------------------------------
# No host sync
# ---------------------------------------------------------------------------------------------

# Ops that make the host wait for the device: reading a value (``.item()``, ``bool()``, ``int()``)
# and results whose size depends on data.
_SYNC_OPS = {"aten._local_scalar_dense.default", "aten.item.default", "aten.nonzero.default",
             "aten.masked_select.default", "aten.unique.default", "aten._unique2.default"}


class HostSyncs(TorchDispatchMode):
    """Records every op of a block that needs a value from the device on the host: the ops above,
    boolean-mask indexing, and ``Tensor.tolist`` (which reads CPU memory without dispatching an
    op, so it is counted by wrapping it)."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def _record(self, what: str) -> None:
        self.found.append(f"{what}\n{''.join(traceback.format_stack(limit=12)[:-2])}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in _SYNC_OPS or (name == "aten.index.Tensor" and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ())):
            self._record(name)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        original = torch.Tensor.tolist
        recorder = self

        def tolist(tensor):
            recorder._record("Tensor.tolist")
            return original(tensor)

        self._restore = original
        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._restore
        return super().__exit__(*exc)


def _keep_every_row(hidden, labels, ignore_index=-100):
    """Stands in for the MLM head's gather of the labelled rows, which is boolean indexing (a
    data-dependent size, so a host sync by nature): every row is kept (an ignored row costs a GEMM
    row and adds nothing), to show that nothing else in the MLM path waits for the device."""
    return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("training", [False, True])
def test_padded_forward_backward_makes_no_host_sync(family, head, training, monkeypatch):
    """A padded batch through a patched model (every option but ``unpad``), forward and
    backward, in eval and in training (dropout): no op reads a value from the device. For
    ForMaskedLM the masked-token gather is replaced by a keep-every-row one (see above); the
    gather itself is the one data-dependent step of the fused MLM loss."""
    if not hasattr(transformers.RobertaModel, "_create_attention_masks"):
        pytest.skip(f"NOT RUN: transformers {transformers.__version__} builds the 4-D mask in the "
                    "model's forward, with a device check of its own")
    model = make_model(family, head, dropout=0.1 if training else 0.0).train(training)
    patch(model)
    batch = make_batch(head)
    skip_if_stock_fails(model, batch)
    monkeypatch.setattr(nn_mlm, "gather_labelled", _keep_every_row)
    with HostSyncs() as syncs:
        out = model(**batch)
        value = out.loss if getattr(out, "loss", None) is not None else (
            out.last_hidden_state.sum() + out.pooler_output.sum())
        value.backward()
    assert not syncs.found, "host syncs:\n" + "\n".join(syncs.found)
    assert all(p.grad is not None for n, p in model.named_parameters()
               if "pooler" not in n and p.requires_grad)


def test_host_sync_detector_sees_the_masked_token_gather_and_unpad():
    """The detector is not blind: the real MLM gather is two boolean indexings, and ``unpad``
    reads its two counts (real tokens, longest row) in one ``tolist``."""
    if not UNPAD_SUPPORTED:
        pytest.skip("NOT RUN: unpad needs transformers >= 5.0")
    model = patch(make_model("roberta", "ForMaskedLM"), unpad=True)
    batch = make_batch("ForMaskedLM")
    with HostSyncs() as syncs:
        model(**batch).loss.backward()
    kinds = [s.split("\n", 1)[0] for s in syncs.found]
    assert kinds.count("aten.index.Tensor") == 2, kinds
    # attention_varlen also checks cu_seqlens on the host, for CPU tensors only (where it is free).
    packing = [s for s in syncs.found if "in unpad_input" in s]
    assert len(packing) == 1 and packing[0].startswith("Tensor.tolist"), kinds
    assert all("in gather_labelled" in s or "in unpad_input" in s or "in _check_cu_seqlens" in s
               for s in syncs.found), syncs.found


@pytest.mark.gpu
@pytest.mark.parametrize("head", ["ForSequenceClassification", "ForTokenClassification"])
def test_no_host_sync_on_gpu(head):
    """CUDA's own sync detector: a padded forward + backward of a patched model raises nothing
    with ``torch.cuda.set_sync_debug_mode("error")``."""
    model = patch(make_model("roberta", head, dropout=0.1).cuda().train())
    batch = {k: v.cuda() for k, v in make_batch(head, batch=4, seqlen=33).items()}
    model(**batch).loss.backward()  # first call: lazy initialisations may sync
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("head", ["ForSequenceClassification", "ForMaskedLM"])
def test_compiles_with_fullgraph(family, head, monkeypatch):
    """A patched model without ``unpad`` traces as one graph, forward and backward (the
    ``aot_eager`` backend: what fullgraph tracing checks, without Inductor's code generation).
    The MLM head's gather has a data-dependent row count, which needs
    ``capture_dynamic_output_shape_ops``."""
    torch._dynamo.reset()
    if head == "ForMaskedLM":
        monkeypatch.setattr(torch._dynamo.config, "capture_dynamic_output_shape_ops", True)
    stock, fast = stock_and_patched(family, head, dropout=0.0)
    batch = make_batch(head)
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    got = compiled(**batch).loss
    got.backward()
    want = stock(**batch).loss
    assert rel_err(got, want) < 1e-5
    assert all(torch.isfinite(p.grad).all() for p in fast.parameters() if p.grad is not None)
    torch._dynamo.reset()


def test_compiles_with_fullgraph_training_under_autocast(monkeypatch):
    """Training mode (the kernels' dropout seeds) under CPU autocast traces as one graph too."""
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "capture_dynamic_output_shape_ops", True)
    model = patch(make_model("roberta", "ForMaskedLM", dropout=0.1).train())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    batch = make_batch("ForMaskedLM")
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = compiled(**batch).loss
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    torch._dynamo.reset()
