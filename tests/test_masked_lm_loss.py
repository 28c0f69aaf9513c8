"""masked_lm_loss: every backend against float64 ``F.cross_entropy`` (loss and the gradients of hidden,
weight and bias), chunking, edge cases, bad input, the custom ops (opcheck, torch.compile) and the
MLM heads swapped into Hugging Face models."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F

import roberta_fast
from roberta_fast.ops import gather_labelled, masked_lm_loss
from roberta_fast.reference.masked_lm_loss import forward_native
from tests.helpers import DTYPES, assert_close, noncontiguous, randn, rel_err

HAS_CUDA = torch.cuda.is_available()
IGNORE = -100


def make_inputs(lead, hidden_size, vocab, dtype=torch.float32, device="cpu", labelled=0.5,
                scale=1.0, label_dtype=torch.int64):
    """Fresh random inputs; about ``labelled`` of the positions carry a label."""
    hidden = randn(*lead, hidden_size, dtype=dtype, device=device, scale=scale)
    weight = randn(vocab, hidden_size, dtype=dtype, device=device, scale=hidden_size ** -0.5)
    bias = randn(vocab, dtype=dtype, device=device, scale=0.5)
    labels = torch.randint(0, vocab, lead, device=device)
    drop = torch.rand(lead, device=device) >= labelled
    labels = labels.masked_fill(drop, IGNORE).to(label_dtype)
    return hidden, weight, bias, labels


def reference(hidden, weight, bias, labels, dtype=torch.float64):
    """Loss and (dhidden, dweight, dbias) of plain PyTorch in ``dtype`` (float64: the oracle)."""
    h, w, b = (t.detach().to(dtype).requires_grad_() for t in (hidden, weight, bias))
    flat = labels.reshape(-1).long()
    logits = F.linear(h.reshape(-1, h.shape[-1]), w, b)
    if bool((flat != IGNORE).any()):
        loss = F.cross_entropy(logits, flat, ignore_index=IGNORE)
    else:
        loss = (logits * 0).sum()  # the documented convention: 0 with zero gradients
    loss.backward()
    return loss.detach(), (h.grad, w.grad, b.grad)


def run(backend, hidden, weight, bias, labels, **kwargs):
    h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    with roberta_fast.use_backend(backend):
        loss = masked_lm_loss(h, w, b, labels, **kwargs)
    loss.backward()
    return loss.detach(), (h.grad, w.grad, b.grad)


def rounded_logit_grad_floor(hidden, weight, bias, labels, dtype, ref_grads):
    """Errors of dweight and dbias when the exact per-row logit gradients are rounded to ``dtype``
    and then summed exactly: what a kernel that keeps the logit gradient in ``dtype`` (as ours
    does, in place of the logits) cannot beat. Over few rows these sums cancel, and this can be
    far above plain PyTorch's lucky error on a handful of numbers."""
    h = hidden.detach().double().reshape(-1, hidden.shape[-1])
    flat = labels.reshape(-1).long()
    keep = flat != IGNORE
    if not bool(keep.any()):
        return 0.0, 0.0
    probs = torch.softmax(F.linear(h[keep], weight.double(), bias.double()), dim=-1)
    grad = (probs - F.one_hot(flat[keep], probs.shape[-1]).double()) / int(keep.sum())
    grad = grad.to(dtype).double()
    return rel_err(grad.T @ h[keep], ref_grads[1]), rel_err(grad.sum(0), ref_grads[2])


def check_against_reference(backend, hidden, weight, bias, labels, dtype, **kwargs):
    loss, grads = run(backend, hidden, weight, bias, labels, **kwargs)
    assert loss.dtype == dtype and loss.shape == ()
    ref_loss, ref_grads = reference(hidden, weight, bias, labels)
    base_loss, base_grads = reference(hidden, weight, bias, labels, dtype=dtype)
    # A scalar's error is one sample, not a norm over many: allow a few rounding units on top of
    # twice plain PyTorch's (which can be lucky on a single number).
    errs = [assert_close(loss, ref_loss, baseline=base_loss, dtype=dtype, name="loss",
                         floor=4 * torch.finfo(dtype).eps)]
    floors = (None,) + tuple(2 * f or None for f in rounded_logit_grad_floor(
        hidden, weight, bias, labels, dtype, ref_grads))
    for name, g, r, base, floor in zip(("dhidden", "dweight", "dbias"), grads, ref_grads,
                                       base_grads, floors):
        assert g.dtype == dtype and g.shape == r.shape, name
        errs.append(assert_close(g, r, baseline=base, dtype=dtype, name=name, floor=floor))
    return errs


BACKEND_VOCABS = [("cpu", v) for v in (1, 7, 1000, 50257, 50265)] + \
                 [("triton", v) for v in (1, 7, 1000)] + \
                 [("reference", v) for v in (1, 7, 1000, 50265)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,vocab", BACKEND_VOCABS)
def test_matches_float64_reference(backend, vocab, dtype, request):
    if backend == "triton":
        request.getfixturevalue("triton_device")
    lead = (3, 5) if vocab <= 1000 else (6,)
    hidden_size = 33 if vocab <= 1000 else 48
    inputs = make_inputs(lead, hidden_size, vocab, dtype)
    check_against_reference(backend, *inputs, dtype)


def _row_ops(triton_device):
    from roberta_fast.triton.masked_lm_loss import masked_lm_loss_rows_triton

    return [(torch.ops.roberta_fast.masked_lm_loss_rows, "cpu"),
            (masked_lm_loss_rows_triton, triton_device)]


def test_large_magnitude_logits_stay_finite_and_exact_in_the_row_kernels(triton_device):
    # |logits| ~ 1e4: exp without the running max overflows. The reference sees the same fp32
    # values in float64, so the kernels must be exact to fp32 rounding.
    logits = randn(9, 1000, scale=1e4)
    labels = torch.randint(0, 1000, (9,))
    labels[4] = IGNORE
    labels[5] = int(logits[5].argmax())  # a row whose label is its max
    exact = logits.double()
    ref_loss = F.cross_entropy(exact, labels, ignore_index=IGNORE, reduction="none")
    ref_grad = (torch.softmax(exact, -1) - F.one_hot(labels.clamp(min=0), 1000)) / 8.0
    ref_grad[4] = 0
    for op, device in _row_ops(triton_device):
        chunk = logits.clone().to(device)
        losses = op(chunk, labels.to(device), torch.full((1,), 1 / 8.0, device=device), IGNORE,
                    True)
        assert torch.isfinite(losses).all() and torch.isfinite(chunk).all()
        assert rel_err(losses, ref_loss) < 1e-6
        assert rel_err(chunk, ref_grad) < 1e-6


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [15, 17, 2048, 2049, 4097])
def test_cpu_row_kernel_at_vector_and_block_tails(vocab, dtype):
    # The CPU row kernel alone, at vocabularies around its vector width (16 lanes) and its
    # 2048-element blocks, on rows with padding after the vocabulary (left untouched).
    rows, pad = 6, 5
    buffer = randn(rows, vocab + pad, scale=3.0).to(dtype)
    chunk = buffer[:, :vocab]
    logits = chunk.clone()
    labels = torch.randint(0, vocab, (rows,))
    labels[2] = IGNORE
    padding = buffer[:, vocab:].clone()
    losses = torch.ops.roberta_fast.masked_lm_loss_rows(chunk, labels, torch.full((1,), 0.2),
                                                       IGNORE, True)

    def expected(x):
        loss = F.cross_entropy(x, labels, ignore_index=IGNORE, reduction="none")
        grad = (torch.softmax(x, -1) - F.one_hot(labels.clamp(min=0), vocab).to(x.dtype)) * 0.2
        grad[2] = 0
        return loss, grad

    ref_loss, ref_grad = expected(logits.double())
    base_loss, base_grad = expected(logits.float())  # plain PyTorch, fp32 math like the kernel's
    assert losses.dtype == torch.float32 and losses[2].item() == 0.0
    assert_close(losses, ref_loss, baseline=base_loss, dtype=torch.float32, name="loss")
    assert_close(chunk, ref_grad, baseline=base_grad.to(dtype), dtype=dtype, name="grad")
    assert torch.equal(buffer[:, vocab:], padding)


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_large_magnitude_logits_through_the_op(backend, request):
    if backend == "triton":
        request.getfixturevalue("triton_device")
    hidden, weight, bias, labels = make_inputs((11,), 16, 1000, scale=2500.0)  # |logits| ~ 1e4
    assert F.linear(hidden, weight, bias).abs().max() > 5e3
    loss, grads = run(backend, hidden, weight, bias, labels)
    ref_loss, ref_grads = reference(hidden, weight, bias, labels)
    base_loss, base_grads = reference(hidden, weight, bias, labels, dtype=torch.float32)
    # fp32 rounding of logits ~1e4 (absolute ~1e-3) already moves the softmax when two top logits
    # are close; that input conditioning is plain PyTorch's too, so only the 2x rule applies.
    for out, ref, base in zip((loss, *grads), (ref_loss, *ref_grads), (base_loss, *base_grads)):
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) <= 2 * rel_err(base, ref) + 1e-6


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_minus_inf_bias_bans_tokens(backend, request):
    if backend == "triton":
        request.getfixturevalue("triton_device")
    hidden, weight, bias, labels = make_inputs((13,), 24, 700)
    labels = labels.masked_fill(labels < 300, IGNORE)  # labels never hit a banned token
    bias = bias.clone()
    bias[:300] = float("-inf")
    loss, grads = run(backend, hidden, weight, bias, labels)
    ref_loss, ref_grads = reference(hidden, weight, bias, labels)
    assert rel_err(loss, ref_loss) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-5
    assert torch.all(grads[2][:300] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_many_chunks_equal_one_chunk(backend, dtype, request):
    if backend == "triton":
        request.getfixturevalue("triton_device")
    inputs = make_inputs((4, 7), 40, 300, dtype)
    one_loss, one_grads = run(backend, *inputs)
    # A budget below one row: every row is its own chunk (28 chunks, multi-chunk dW accumulation).
    many_loss, many_grads = run(backend, *inputs, chunk_bytes=1)
    three_loss, _ = run(backend, *inputs, chunk_bytes=3 * 320 * inputs[0].element_size())
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(many_loss, one_loss) < tol and rel_err(three_loss, one_loss) < tol
    for g1, gm in zip(one_grads, many_grads):
        assert rel_err(gm, g1) < tol
    check_against_reference(backend, *inputs, dtype, chunk_bytes=1)


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_nothing_labelled_gives_zero_loss_and_zero_grads(backend, request):
    if backend == "triton":
        request.getfixturevalue("triton_device")
    hidden, weight, bias, labels = make_inputs((2, 9), 20, 50)
    labels = torch.full_like(labels, IGNORE)
    loss, grads = run(backend, hidden, weight, bias, labels)
    assert loss.item() == 0.0
    for g in grads:
        assert torch.isfinite(g).all() and torch.count_nonzero(g) == 0
    # Stock cross-entropy returns NaN here; the documented convention is 0.
    assert torch.isnan(F.cross_entropy(F.linear(hidden, weight, bias).reshape(-1, 50),
                                       labels.reshape(-1)))


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_every_token_labelled_and_batch_of_one(backend, request):
    if backend == "triton":
        request.getfixturevalue("triton_device")
    check_against_reference(backend, *make_inputs((3, 4), 24, 130, labelled=1.0), torch.float32)
    check_against_reference(backend, *make_inputs((1,), 24, 130, labelled=1.0), torch.float32)
    check_against_reference(backend, *make_inputs((1, 1), 24, 130, labelled=1.0), torch.float32)
    hidden, weight, bias, labels = make_inputs((0,), 24, 130)
    loss, grads = run(backend, hidden, weight, bias, labels)
    assert loss.item() == 0.0 and grads[1].abs().sum() == 0


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_int32_and_int64_labels_agree(backend, request):
    if backend == "triton":
        request.getfixturevalue("triton_device")
    hidden, weight, bias, labels = make_inputs((5, 3), 16, 90)
    loss64, grads64 = run(backend, hidden, weight, bias, labels)
    loss32, grads32 = run(backend, hidden, weight, bias, labels.to(torch.int32))
    assert torch.equal(loss64, loss32)
    for a, b in zip(grads64, grads32):
        assert torch.equal(a, b)


def test_custom_ignore_index_and_noncontiguous_hidden():
    hidden, weight, bias, labels = make_inputs((6, 5), 32, 80)
    labels = torch.where(labels == IGNORE, torch.full_like(labels, -1), labels)
    h = noncontiguous(hidden)
    loss = masked_lm_loss(h, weight, bias, labels, ignore_index=-1)
    keep = labels != -1
    ref = F.cross_entropy(F.linear(hidden.double()[keep], weight.double(), bias.double()),
                          labels[keep])
    assert rel_err(loss, ref) < 1e-5


def test_grad_output_scales_gradients_and_second_backward_fails():
    hidden, weight, bias, labels = make_inputs((4, 6), 16, 64)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    (masked_lm_loss(h, w, b, labels) * 3.5).backward()
    _, ref_grads = reference(hidden, weight, bias, labels)
    for g, r in zip((h.grad, w.grad, b.grad), ref_grads):
        assert rel_err(g, 3.5 * r) < 1e-5
    # The gradients computed in the forward are handed over without a copy: backward runs once.
    loss = masked_lm_loss(h, w, b, labels) * 2.0
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError):
        loss.backward()


def test_only_requested_gradients_and_no_grad_mode():
    hidden, weight, bias, labels = make_inputs((4, 6), 16, 64)
    w = weight.clone().requires_grad_()
    loss = masked_lm_loss(hidden, w, bias, labels)  # only the weight needs a gradient
    loss.backward()
    ref_loss, ref_grads = reference(hidden, weight, bias, labels)
    assert rel_err(w.grad, ref_grads[1]) < 1e-5
    with torch.no_grad():
        loss = masked_lm_loss(hidden.requires_grad_(), w, bias, labels)
    assert not loss.requires_grad and rel_err(loss, ref_loss) < 1e-5


def test_forward_native_is_cross_entropy_and_zero_when_empty():
    hidden, weight, bias, labels = make_inputs((3, 7), 16, 40, dtype=torch.float64)
    expected = F.cross_entropy(F.linear(hidden, weight, bias).reshape(-1, 40), labels.reshape(-1))
    assert torch.allclose(forward_native(hidden, weight, bias, labels), expected, rtol=1e-12)
    empty = torch.full_like(labels, IGNORE)
    assert forward_native(hidden, weight, bias, empty).item() == 0.0


def test_gather_labelled_keeps_labelled_rows_in_order():
    hidden, _, _, labels = make_inputs((3, 8), 12, 30)
    rows, row_labels = gather_labelled(hidden, labels)
    keep = labels.reshape(-1) != IGNORE
    assert torch.equal(rows, hidden.reshape(-1, 12)[keep])
    assert torch.equal(row_labels, labels.reshape(-1)[keep])
    with pytest.raises(ValueError, match="must match"):
        gather_labelled(hidden, labels[:, :4])


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("bad", [50, 51, -1, -7])
def test_label_out_of_range_raises(backend, bad, request):
    if backend == "triton":
        request.getfixturevalue("triton_device")
    hidden, weight, bias, labels = make_inputs((2, 5), 16, 50)
    labels[1, 3] = bad
    with roberta_fast.use_backend(backend):
        with pytest.raises(ValueError, match=r"outside \[0, 50\)"):
            masked_lm_loss(hidden, weight, bias, labels)


def test_bad_inputs_raise_clear_errors():
    hidden, weight, bias, labels = make_inputs((2, 5), 16, 50)
    with pytest.raises(TypeError, match="int64 or int32"):
        masked_lm_loss(hidden, weight, bias, labels.float())
    with pytest.raises(ValueError, match="leading"):
        masked_lm_loss(hidden, weight, bias, labels[:, :4])
    with pytest.raises(ValueError, match="hidden size"):
        masked_lm_loss(hidden, weight[:, :15], bias, labels)
    with pytest.raises(ValueError, match="bias"):
        masked_lm_loss(hidden, weight, bias[:49], labels)
    with pytest.raises(ValueError, match="2-D"):
        masked_lm_loss(hidden, weight[0], bias, labels)
    with pytest.raises(TypeError, match="dtype"):
        masked_lm_loss(hidden, weight.double(), bias, labels)
    with pytest.raises(TypeError, match="dtype"):
        masked_lm_loss(hidden, weight.half(), bias, labels)
    with pytest.raises(ValueError, match="device"):
        masked_lm_loss(hidden, weight.to("meta"), bias, labels)
    with pytest.raises(ValueError, match="device"):
        masked_lm_loss(hidden, weight, bias, labels.to("meta"))
    with pytest.raises(ValueError, match="chunk_bytes"):
        masked_lm_loss(hidden, weight, bias, labels, chunk_bytes=0)
    with pytest.raises(TypeError, match="ignore_index"):
        masked_lm_loss(hidden, weight, bias, labels, ignore_index=-100.0)


def test_native_row_op_rejects_bad_arguments():
    op = torch.ops.roberta_fast.masked_lm_loss_rows
    logits = randn(4, 10)
    labels = torch.randint(0, 10, (4,))
    scale = torch.ones(1)
    with pytest.raises(ValueError, match="labels must be 1-D"):
        op(logits, labels[:3], scale, IGNORE, True)
    with pytest.raises(TypeError, match="int64 or int32"):
        op(logits, labels.float(), scale, IGNORE, True)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        op(logits.double(), labels, scale, IGNORE, True)
    with pytest.raises(ValueError, match="contiguous"):
        op(logits.t(), labels, scale, IGNORE, True)
    with pytest.raises(TypeError, match="scale"):
        op(logits, labels, scale.double(), IGNORE, True)


# ----------------------------------------------------------------------------- custom ops


def _row_op_samples(device="cpu"):
    samples = []
    for dtype in (torch.float32, torch.bfloat16):
        logits = randn(6, 37, dtype=dtype, device=device)
        labels = torch.randint(0, 37, (6,), device=device)
        labels[2] = IGNORE
        scale = torch.full((1,), 0.2, device=device)
        samples.append((logits, labels, scale, IGNORE, True))
        samples.append((logits.clone(), labels.int(), scale, IGNORE, False))
    return samples


def test_opcheck_native_row_op():
    for args in _row_op_samples():
        torch.library.opcheck(torch.ops.roberta_fast.masked_lm_loss_rows.default, args)


def test_opcheck_triton_row_op(triton_device):
    from roberta_fast.triton.masked_lm_loss import masked_lm_loss_rows_triton

    for args in _row_op_samples(triton_device):
        torch.library.opcheck(masked_lm_loss_rows_triton, args)


def test_opcheck_fused_op():
    hidden, weight, bias, labels = make_inputs((9,), 16, 40)
    op = torch.ops.roberta_fast.masked_lm_loss_fused.default
    for grads in ((True, True, True), (False, True, False), (False, False, False)):
        for chunk_rows, return_logits in ((64, False), (2, True)):
            args = (hidden.clone().requires_grad_(grads[0]), weight.clone().requires_grad_(grads[1]),
                    bias.clone().requires_grad_(grads[2]), labels, IGNORE, "cpu", chunk_rows,
                    *grads, return_logits)
            torch.library.opcheck(op, args)


def test_row_kernels_write_gradient_in_place(triton_device):
    logits = randn(5, 123, dtype=torch.float64)
    labels = torch.tensor([3, IGNORE, 0, 122, 60])
    scale = torch.full((1,), 0.25)
    ref_loss = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")
    ref_grad = (torch.softmax(logits, -1) - F.one_hot(labels.clamp(min=0), 123)) * 0.25
    ref_grad[1] = 0
    for op, device in _row_ops(triton_device):
        chunk = logits.float().to(device)
        losses = op(chunk, labels.to(device), scale.to(device), IGNORE, True)
        assert rel_err(losses, ref_loss) < 1e-6
        assert rel_err(chunk, ref_grad) < 1e-6


def test_torch_compile_runs_the_op():
    hidden, weight, bias, labels = make_inputs((3, 8), 16, 70)

    def step(h, w, b, lab):
        return masked_lm_loss(h, w, b, lab) * 2.0

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    eager_loss, eager_grads = None, None
    for fn in (step, compiled):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        loss = fn(h, w, b, labels)
        loss.backward()
        if eager_loss is None:
            eager_loss, eager_grads = loss.detach(), (h.grad, w.grad, b.grad)
        else:
            assert rel_err(loss, eager_loss) < 1e-6
            for g, e in zip((h.grad, w.grad, b.grad), eager_grads):
                assert rel_err(g, e) < 1e-6


def test_torch_compile_inductor_runs_the_op():
    hidden, weight, bias, labels = make_inputs((2, 5), 16, 30)
    compiled = torch.compile(lambda h, w, b, lab: masked_lm_loss(h, w, b, lab), fullgraph=True)
    h = hidden.clone().requires_grad_()
    loss = compiled(h, weight, bias, labels)
    loss.backward()
    ref_loss, ref_grads = reference(hidden, weight, bias, labels)
    assert rel_err(loss, ref_loss) < 1e-5 and rel_err(h.grad, ref_grads[0]) < 1e-5


# ----------------------------------------------------------------------------- HF models


def _roberta(vocab=97):
    from transformers import RobertaConfig, RobertaForMaskedLM

    config = RobertaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=37, max_position_embeddings=40,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return RobertaForMaskedLM(config)


def _xlm_roberta(vocab=83):
    from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM

    config = XLMRobertaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=37,
                              max_position_embeddings=40, hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0)
    return XLMRobertaForMaskedLM(config)


def _bert(vocab=89):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=37, max_position_embeddings=40,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForMaskedLM(config)


def _batch(vocab, batch=3, length=11):
    input_ids = torch.randint(3, vocab, (batch, length))
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[1, 7:] = 0  # padding
    attention_mask[2, 4:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 1)
    labels = torch.randint(0, vocab, (batch, length))
    labels = labels.masked_fill((torch.rand(batch, length) > 0.3) | (attention_mask == 0), IGNORE)
    labels[0, 0] = 5  # at least one label
    return input_ids, attention_mask, labels


def _loss_and_grads(model, input_ids, attention_mask, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _family(family):
    """(stock model, fast class) for a family name."""
    from roberta_fast.nn import FastBertForMaskedLM, FastRobertaForMaskedLM, FastXLMRobertaForMaskedLM

    return {"roberta": (_roberta, FastRobertaForMaskedLM),
            "xlm-roberta": (_xlm_roberta, FastXLMRobertaForMaskedLM),
            "bert": (_bert, FastBertForMaskedLM)}[family]


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("family", ["roberta", "xlm-roberta", "bert"])
def test_converted_model_matches_stock_loss_and_all_gradients(family, backend, request):
    if backend == "triton":
        request.getfixturevalue("triton_device")
    make, cls = _family(family)
    stock = make().eval()  # dropout off; gradients still flow
    fast = copy.deepcopy(stock)
    params_before = {n: p for n, p in fast.named_parameters()}
    keys_before = list(fast.state_dict())
    assert cls.convert(fast, logits="none") is fast
    assert isinstance(fast, cls)
    assert {n: p for n, p in fast.named_parameters()} == params_before  # same objects
    assert list(fast.state_dict()) == keys_before
    if family != "bert":
        assert fast.lm_head.decoder.weight is fast.roberta.embeddings.word_embeddings.weight
        assert fast.lm_head.decoder.bias is fast.lm_head.bias
    else:
        assert fast.cls.predictions.decoder.weight is fast.bert.embeddings.word_embeddings.weight
    input_ids, attention_mask, labels = _batch(stock.config.vocab_size)
    stock_out, stock_grads = _loss_and_grads(stock, input_ids, attention_mask, labels)
    with roberta_fast.use_backend(backend):
        fast_out, fast_grads = _loss_and_grads(fast, input_ids, attention_mask, labels)
    assert rel_err(fast_out.loss, stock_out.loss) < 1e-5
    assert fast_out.logits is None
    assert set(fast_grads) == set(stock_grads)
    for name, grad in stock_grads.items():
        # The floor covers gradients that are zero in exact arithmetic (attention key biases).
        assert (fast_grads[name] - grad).norm() <= 1e-5 * grad.norm() + 1e-9, name


def test_logits_modes_and_unlabelled_forward():
    from roberta_fast.nn import FastRobertaForMaskedLM, MaskedLMHead

    stock = _roberta().eval()
    fast = FastRobertaForMaskedLM.convert(copy.deepcopy(stock))
    input_ids, attention_mask, labels = _batch(stock.config.vocab_size)
    with torch.no_grad():
        stock_out = stock(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        plain = fast(input_ids=input_ids, attention_mask=attention_mask)
        assert plain.loss is None and torch.equal(plain.logits, stock_out.logits)
        keep = labels != IGNORE
        for mode, shape in (("masked", (int(keep.sum()), 97)), ("full", (3, 11, 97)),
                            ("none", None)):
            fast.lm_head.logits_mode = mode
            out = fast(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            assert rel_err(out.loss, stock_out.loss) < 1e-5, mode
            if shape is None:
                assert out.logits is None
                continue
            assert tuple(out.logits.shape) == shape, mode
            expected = stock_out.logits[keep] if mode == "masked" else stock_out.logits
            assert rel_err(out.logits, expected) < 1e-5, mode
        # return_dict=False gives the stock tuple layout.
        as_tuple = fast(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                        return_dict=False)
        assert isinstance(as_tuple, tuple) and rel_err(as_tuple[0], stock_out.loss) < 1e-5
        # Nothing labelled: 0, not stock's NaN.
        none = fast(input_ids=input_ids, attention_mask=attention_mask,
                    labels=torch.full_like(labels, IGNORE))
        assert none.loss.item() == 0.0
    with pytest.raises(ValueError, match="logits mode"):
        FastRobertaForMaskedLM.convert(copy.deepcopy(stock), logits="all")
    with pytest.raises(TypeError, match="RobertaForMaskedLM"):
        FastRobertaForMaskedLM.convert(torch.nn.Linear(2, 2))
    head = MaskedLMHead(stock.config)
    assert list(head.state_dict()) == list(stock.lm_head.state_dict())


@pytest.mark.parametrize("family", ["roberta", "xlm-roberta", "bert"])
def test_stock_call_forms(family):
    """Positional arguments bind as in the stock signature of this transformers release, and
    return_dict=False gives stock's tuple: (loss, logits) with labels, (logits,) without."""
    make, cls = _family(family)
    stock = make().eval()
    fast = cls.convert(copy.deepcopy(stock), logits="full")
    input_ids, attention_mask, labels = _batch(stock.config.vocab_size)
    with torch.no_grad():
        want = stock(input_ids, attention_mask, labels=labels, return_dict=False)
        got = fast(input_ids, attention_mask, labels=labels, return_dict=False)
        assert isinstance(got, tuple) and len(got) == len(want) == 2
        for a, b in zip(got, want):
            assert rel_err(a, b) < 1e-5
        plain = fast(input_ids, attention_mask, return_dict=False)
        assert len(plain) == 1 and rel_err(plain[0], want[1]) < 1e-5
    with pytest.raises(TypeError, match="multiple values"):
        fast(input_ids, input_ids=input_ids)
    with pytest.raises(TypeError, match="positional"):
        fast(*([None] * 40))


def test_full_logits_mode_backpropagates_like_stock():
    from roberta_fast.nn import FastRobertaForMaskedLM

    stock = _roberta().eval()
    fast = FastRobertaForMaskedLM.convert(copy.deepcopy(stock), logits="full")
    input_ids, attention_mask, labels = _batch(stock.config.vocab_size)
    stock_out, stock_grads = _loss_and_grads(stock, input_ids, attention_mask, labels)
    fast_out, fast_grads = _loss_and_grads(fast, input_ids, attention_mask, labels)
    assert rel_err(fast_out.logits, stock_out.logits) < 1e-5
    for name, grad in stock_grads.items():
        assert (fast_grads[name] - grad).norm() <= 1e-5 * grad.norm() + 1e-9, name


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_roberta_base_sizes_bf16(backend):
    if backend == "cuda" and not roberta_fast.available_backends()["cuda"].startswith("ok"):
        pytest.fail(f"cuda backend unavailable on a GPU machine: "
                    f"{roberta_fast.available_backends()['cuda']}")
    hidden, weight, bias, labels = make_inputs((8, 128), 768, 50265, torch.bfloat16, "cuda",
                                               labelled=0.15)
    errs = check_against_reference(backend, hidden, weight, bias, labels, torch.bfloat16)
    assert max(errs) < 1e-2
    # Several chunks (multi-chunk fp32 weight-gradient accumulation) give the same answer.
    check_against_reference(backend, hidden, weight, bias, labels, torch.bfloat16,
                            chunk_bytes=40 * 50304 * 2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_cuda_graph_capture_matches_eager(backend):
    hidden, weight, bias, labels = make_inputs((4, 64), 768, 50265, torch.bfloat16, "cuda",
                                               labelled=0.15)
    with roberta_fast.use_backend(backend):
        eager = masked_lm_loss(hidden, weight, bias, labels)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            masked_lm_loss(hidden, weight, bias, labels)  # warm-up outside capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = masked_lm_loss(hidden, weight, bias, labels)
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(captured, eager)


@pytest.mark.gpu
def test_gpu_bad_label_is_nan_by_default_and_an_error_in_check_mode(monkeypatch):
    hidden, weight, bias, labels = make_inputs((3, 16), 64, 1000, device="cuda")
    labels[1, 2] = 1000
    for backend in ("cuda", "triton"):
        with roberta_fast.use_backend(backend):
            monkeypatch.delenv("ROBERTA_FAST_CHECK_LABELS", raising=False)
            assert torch.isnan(masked_lm_loss(hidden, weight, bias, labels)).item()
            monkeypatch.setenv("ROBERTA_FAST_CHECK_LABELS", "1")
            with pytest.raises(ValueError, match="outside"):
                masked_lm_loss(hidden, weight, bias, labels)


@pytest.mark.gpu
def test_gpu_triton_on_a_device_that_is_not_current():
    if torch.cuda.device_count() < 2:
        pytest.skip("NOT RUN: needs two CUDA devices")
    assert torch.cuda.current_device() == 0
    hidden, weight, bias, labels = make_inputs((4, 32), 128, 5000, torch.bfloat16, "cuda:1",
                                               labelled=0.3)
    check_against_reference("triton", hidden, weight, bias, labels, torch.bfloat16)
    assert torch.cuda.current_device() == 0
