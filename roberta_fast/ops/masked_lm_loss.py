"""Masked-LM loss without ``[tokens, vocab]`` logits: a chunked, fused linear + cross-entropy.

``masked_lm_loss(hidden, weight, bias, labels)`` is the mean cross-entropy of
``hidden @ weight.T + bias`` over the positions whose label is not ``ignore_index``. The rows are
processed in chunks whose size comes from a memory budget; per chunk:

1. ``logits = bias + hidden_chunk @ weight.T`` (one GEMM, in the input dtype);
2. one row kernel (C++ / CUDA / Triton) computes each row's log-sum-exp with a running max (fp32)
   and its loss, and overwrites the logits IN PLACE with the gradient of the mean loss,
   ``(softmax - onehot(label)) / n_labelled`` (zero for ignored rows);
3. ``dhidden_chunk = grad @ weight``, ``dweight += grad.T @ hidden_chunk``, ``dbias += grad.sum(0)``.

So the forward computes the gradients (as a fused linear cross-entropy does) and the backward only
scales them by the incoming gradient. Peak extra memory is one chunk of logits plus the gradient
buffers, whatever the batch. When no input needs a gradient (evaluation) the gradient work is
skipped. The number of labelled rows stays a device tensor: no host sync, so the op can be
captured in a CUDA graph and traced by ``torch.compile`` (it is one opaque custom op there).

Mixed precision: under ``torch.autocast`` the logits GEMM runs in the autocast dtype and the
cross-entropy in fp32 with an fp32 loss, what the stock decoder Linear and ``CrossEntropyLoss``
compute there (the inputs are cast in :func:`masked_lm_loss`, which follows whichever autocast
dtype is active; a ``torch.library`` autocast registration would fix one dtype per device).

Rows labelled ``ignore_index`` cost a GEMM row but contribute nothing: callers that can afford a
host sync should drop them first with :func:`gather_labelled` (the nn modules do).

Labels outside ``[0, V)`` (other than ``ignore_index``): on CPU tensors they raise ``ValueError``.
On CUDA tensors checking would wait for the device on every call, so by default the kernels instead
never address memory with such a label and make the loss NaN (never a device assert, never a
silently wrong finite loss); set ``ROBERTA_FAST_CHECK_LABELS=1`` to get the ``ValueError`` on CUDA
too, at the cost of one sync per call.
"""
from __future__ import annotations

import os

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import backends
from ._common import check_float, check_same

__all__ = ["masked_lm_loss", "gather_labelled", "DEFAULT_CHUNK_BYTES"]

# Budget for one chunk of logits. GPU: large chunks keep the GEMMs efficient and usually cover a
# whole batch's masked rows in one chunk (32 x 512 tokens, 15% masked, bf16 roberta-base: ~250 MB).
# CPU: every chunk re-reads the whole [V, H] weight three times (150 MB in fp32 for roberta-base),
# so chunks must stay large too; 64 MiB is ~330 rows of roberta-base fp32 logits.
DEFAULT_CHUNK_BYTES = {"cuda": 256 << 20, "cpu": 64 << 20}
CHUNK_ENV_VAR = "ROBERTA_FAST_MLM_CHUNK_BYTES"
CHECK_LABELS_ENV_VAR = "ROBERTA_FAST_CHECK_LABELS"

# Row stride of the logits chunk buffer, in elements: rows start on 128-byte boundaries for fp16/bf16
# (256 bytes for fp32), which the GEMMs and the 16-byte vector loads of the kernels like.
_ROW_ALIGN = 64

_LABEL_DTYPES = (torch.int64, torch.int32)


def check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Raise ``ValueError`` if a label is outside ``[0, vocab)`` and not ``ignore_index``.

    Reads the result on the host: free for CPU tensors, a device sync for CUDA tensors.
    """
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        index = int(bad.reshape(-1).nonzero()[0, 0])
        value = int(labels.reshape(-1)[index])
        raise ValueError(f"masked_lm_loss: label {value} at position {index} is outside [0, "
                         f"{vocab}) and is not ignore_index ({ignore_index})")


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  labels: torch.Tensor, ignore_index: int) -> None:
    check_float("hidden", hidden)
    check_float("weight", weight)
    check_float("bias", bias)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in _LABEL_DTYPES:
        raise TypeError(f"labels must be int64 or int32 class indices, got {labels.dtype}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least one dimension [..., H]")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, H], got shape {tuple(weight.shape)}")
    vocab, hidden_size = weight.shape
    if hidden.shape[-1] != hidden_size:
        raise ValueError(f"hidden has hidden size {hidden.shape[-1]} but weight [V, H] has H = "
                         f"{hidden_size}")
    if vocab < 1:
        raise ValueError("weight has an empty vocabulary (V = 0)")
    if bias.dim() != 1 or bias.shape[0] != vocab:
        raise ValueError(f"bias must have shape [V] = [{vocab}], got {tuple(bias.shape)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels have shape {tuple(labels.shape)} but hidden's leading "
                         f"dimensions are {tuple(hidden.shape[:-1])}; they must match")
    check_same({"hidden": hidden, "weight": weight, "bias": bias})
    check_same({"hidden": hidden, "labels": labels}, dtype=False)


def gather_labelled(hidden: torch.Tensor, labels: torch.Tensor,
                    ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of ``hidden`` (``[..., H]``) whose label is not ``ignore_index``, and their labels:
    ``([n, H], [n])``, in order.

    Boolean indexing: the number of rows is data-dependent, so on CUDA this waits for the device
    (a host sync) and cannot be captured in a CUDA graph. ``masked_lm_loss`` itself does not need
    it; it saves the GEMM work of unlabelled rows (~85% of them in MLM pre-training).
    """
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels have shape {tuple(labels.shape)} but hidden's leading "
                         f"dimensions are {tuple(hidden.shape[:-1])}; they must match")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    keep = flat_labels != ignore_index
    return flat_hidden[keep], flat_labels[keep]


# The helpers below read a context variable and the environment, which torch.compile cannot trace:
# their results are taken as constants of the compiled graph (decided when it is traced).


@torch.compiler.assume_constant_result
def _resolve_backend(device_type: str) -> str:
    return backends.resolve(device_type)


@torch.compiler.assume_constant_result
def _check_labels_on_host(device_type: str, backend: str) -> bool:
    # The reference always checks (on CUDA, F.cross_entropy would otherwise hit a device assert);
    # the CPU kernels check themselves; the CUDA kernels only on request, since it syncs.
    if backend == "reference":
        return True
    return device_type == "cuda" and os.environ.get(CHECK_LABELS_ENV_VAR) == "1"


@torch.compiler.assume_constant_result
def _chunk_rows(device_type: str, vocab: int, element_size: int, chunk_bytes: int | None) -> int:
    if chunk_bytes is None:
        env = os.environ.get(CHUNK_ENV_VAR)
        if env:
            try:
                chunk_bytes = int(env)
            except ValueError:
                raise ValueError(f"{CHUNK_ENV_VAR} must be an integer number of bytes, got "
                                 f"{env!r}") from None
        else:
            chunk_bytes = DEFAULT_CHUNK_BYTES.get(device_type, DEFAULT_CHUNK_BYTES["cpu"])
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
    return max(1, chunk_bytes // (_padded(vocab) * element_size))


def _padded(vocab: int) -> int:
    return (vocab + _ROW_ALIGN - 1) // _ROW_ALIGN * _ROW_ALIGN


def _row_kernel(backend: str):
    if backend == "triton":
        from ..triton.masked_lm_loss import masked_lm_loss_rows_triton

        return masked_lm_loss_rows_triton
    return torch.ops.roberta_fast.masked_lm_loss_rows


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


@torch.library.custom_op("roberta_fast::masked_lm_loss_fused", mutates_args=())
def _fused(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor,
           ignore_index: int, backend: str, chunk_rows: int, grad_hidden: bool,
           grad_weight: bool, grad_bias: bool, return_logits: bool
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunk loop on 2-D ``hidden [n, H]`` and 1-D ``labels [n]``.

    Returns ``(loss, dhidden, dweight, dbias, logits)``: the fp32 loss, the gradients of the mean
    loss (empty where not requested) and, with ``return_logits``, a copy of the ``[n, V]`` logits
    taken before the kernel overwrites them (else empty).
    """
    rows, _ = hidden.shape
    vocab = weight.shape[0]
    compute_grad = grad_hidden or grad_weight or grad_bias
    kernel = _row_kernel(backend)
    # 1 / number of labelled rows, kept on the device; nothing labelled gives scale 1 and loss 0.
    labelled = (labels != ignore_index).sum()
    scale = (1.0 / labelled.clamp(min=1).to(torch.float32)).reshape(1)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    dhidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if grad_hidden \
        else _empty(hidden)
    dweight = None
    dweight_fp32 = None  # multi-chunk accumulation of a half-precision dweight
    dbias = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if grad_bias else None
    logits_out = hidden.new_empty(rows, vocab) if return_logits else _empty(hidden)
    chunk = max(1, min(chunk_rows, rows))
    buffer = hidden.new_empty(chunk, _padded(vocab))
    multi_chunk = rows > chunk
    for start in range(0, rows, chunk):
        end = min(rows, start + chunk)
        h = hidden[start:end]
        logits = buffer[: end - start, :vocab]
        torch.addmm(bias, h, weight.t(), out=logits)
        if return_logits:
            logits_out[start:end].copy_(logits)
        row_losses = kernel(logits, labels[start:end], scale, ignore_index, compute_grad)
        loss += row_losses.sum()
        if not compute_grad:
            continue
        grad = logits  # now holds d(mean loss) / d(logits)
        if grad_hidden:
            torch.mm(grad, weight, out=dhidden[start:end])
        if grad_weight:
            if dweight is None and not (multi_chunk and weight.dtype != torch.float32):
                dweight = torch.mm(grad.t(), h)
            elif weight.dtype == torch.float32:
                dweight.addmm_(grad.t(), h)
            else:
                # Half-precision weight over several chunks: sum the chunks in fp32.
                part = torch.mm(grad.t(), h).float()
                dweight_fp32 = part if dweight_fp32 is None else dweight_fp32.add_(part)
        if grad_bias:
            dbias += grad.sum(0, dtype=torch.float32)
    del buffer
    if grad_weight:
        if dweight_fp32 is not None:
            dweight = dweight_fp32.to(weight.dtype)
        elif dweight is None:  # no rows at all
            dweight = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    else:
        dweight = _empty(weight)
    dbias = dbias.to(bias.dtype) if grad_bias else _empty(bias)
    return loss * scale[0], dhidden, dweight, dbias, logits_out


@_fused.register_fake
def _(hidden, weight, bias, labels, ignore_index, backend, chunk_rows, grad_hidden, grad_weight,
      grad_bias, return_logits):
    rows = hidden.shape[0]
    vocab = weight.shape[0]
    return (hidden.new_empty((), dtype=torch.float32),
            torch.empty_like(hidden, memory_format=torch.contiguous_format) if grad_hidden
            else hidden.new_empty(0),
            torch.empty_like(weight, memory_format=torch.contiguous_format) if grad_weight
            else weight.new_empty(0),
            torch.empty_like(bias) if grad_bias else bias.new_empty(0),
            hidden.new_empty(rows, vocab) if return_logits else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    _, dhidden, dweight, dbias, logits = output
    ctx.save_for_backward(dhidden, dweight, dbias)
    ctx.wants = inputs[7:10]  # grad_hidden, grad_weight, grad_bias
    ctx.mark_non_differentiable(dhidden, dweight, dbias, logits)
    # Otherwise autograd hands the backward zero tensors for those outputs: a [V, H] one included.
    ctx.set_materialize_grads(False)


def _plain_eager(t: torch.Tensor) -> bool:
    """Whether ``t`` is a real tensor outside any tracing (compile, AOT, make_fx, fake modes)."""
    return (type(t) is torch.Tensor and not torch.compiler.is_compiling()
            and _get_current_dispatch_mode() is None)


def _backward(ctx, grad_loss, *_unused):
    dhidden, dweight, dbias = ctx.saved_tensors
    if grad_loss is None:  # grads are not materialized: the loss did not reach the output
        return (None,) * 11
    grad_loss = grad_loss.to(torch.float32)
    # The saved gradients were computed for d(output) = 1. They are scaled in place (no copy of the
    # [V, H] weight gradient): a second backward through the same forward then fails autograd's
    # saved-tensor version check instead of returning wrong values. When traced (torch.compile,
    # opcheck) the scaling is out of place, which is what the tracers expect of a backward.
    eager = _plain_eager(grad_loss)
    if eager and grad_loss.device.type == "cpu" and float(grad_loss) == 1.0:
        scaled = [dhidden, dweight, dbias]  # CPU: checking for the usual 1.0 costs nothing
    elif eager:
        scaled = [t.mul_(grad_loss) for t in (dhidden, dweight, dbias)]
    else:
        scaled = [t * grad_loss.to(t.dtype) for t in (dhidden, dweight, dbias)]
    grads = [g if want else None for g, want in zip(scaled, ctx.wants)]
    return (*grads, None, None, None, None, None, None, None, None)


_fused.register_autograd(_backward, setup_context=_setup_context)


def _register_native_fake() -> None:
    """Fake (meta) impl of the C++/CUDA row op, when the extension registered it."""
    if backends.native_module() is None:
        return
    try:
        torch.ops.roberta_fast.masked_lm_loss_rows
    except (AttributeError, RuntimeError):
        return

    @torch.library.register_fake("roberta_fast::masked_lm_loss_rows")
    def _(logits, labels, scale, ignore_index, write_grad):
        return logits.new_empty(logits.shape[0], dtype=torch.float32)


_register_native_fake()


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs matmuls in on ``device_type`` now, or None when off."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _masked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    labels: torch.Tensor, ignore_index: int, chunk_bytes: int | None,
                    return_logits: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(loss, logits [n, V] or None)`` on flattened rows; shared by the op and the modules."""
    autocast = _autocast_dtype(hidden.device.type) if isinstance(hidden, torch.Tensor) else None
    if autocast is not None:
        # What stock's decoder Linear + CrossEntropyLoss do under autocast: the logits GEMM in the
        # autocast dtype (the casts are differentiable, so parameter gradients come back in the
        # parameters' dtype), the cross-entropy in fp32 (the row kernels' statistics are fp32).
        hidden, weight, bias = (t.to(autocast) if isinstance(t, torch.Tensor)
                                and t.is_floating_point() else t for t in (hidden, weight, bias))
    _check_inputs(hidden, weight, bias, labels, ignore_index)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    labels1d = labels.reshape(-1)
    device_type = hidden.device.type
    backend = _resolve_backend(device_type)
    vocab = weight.shape[0]
    if _check_labels_on_host(device_type, backend):
        check_label_range(labels1d, vocab, ignore_index)
    if backend == "reference":
        from ..reference.masked_lm_loss import forward_native

        loss = forward_native(hidden2d, weight, bias, labels1d, ignore_index)
        logits = None
        if return_logits:
            with torch.no_grad():
                logits = torch.nn.functional.linear(hidden2d, weight, bias)
        return loss, logits
    chunk_rows = _chunk_rows(device_type, vocab, hidden.element_size(), chunk_bytes)
    need = torch.is_grad_enabled()
    loss, _, _, _, logits = _fused(
        hidden2d, weight, bias, labels1d, ignore_index, backend, chunk_rows,
        need and hidden.requires_grad, need and weight.requires_grad,
        need and bias.requires_grad, return_logits)
    if autocast is None:  # as F.cross_entropy: the loss in the logits' dtype, fp32 under autocast
        loss = loss.to(hidden.dtype)
    return loss, (logits if return_logits else None)


def masked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   labels: torch.Tensor, *, ignore_index: int = -100,
                   chunk_bytes: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T + bias`` over the positions whose label is not
    ``ignore_index``, without ever holding the logits of all rows.

    Args:
        hidden: ``[..., H]`` float32/float16/bfloat16, already through the LM-head transform.
        weight: ``[V, H]`` decoder weight (tied to the word embeddings in RoBERTa/BERT).
        bias: ``[V]`` decoder bias.
        labels: ``[...]`` (hidden's leading dimensions), int64 or int32 class indices.
        ignore_index: label of positions that carry no loss.
        chunk_bytes: memory budget of one chunk of logits (default ``DEFAULT_CHUNK_BYTES`` per
            device type, or env ``ROBERTA_FAST_MLM_CHUNK_BYTES``).

    Returns:
        A scalar in hidden's dtype, differentiable w.r.t. hidden, weight and bias. When no position
        is labelled the loss is 0 with zero gradients (``F.cross_entropy`` returns NaN there).

    Under ``torch.autocast`` (any device type, bf16 or fp16) the op does what the stock decoder
    Linear and ``CrossEntropyLoss`` do there: hidden, weight and bias are cast to the autocast
    dtype for the logits GEMM, the cross-entropy is computed in fp32 and the loss is returned in
    fp32; gradients reach the parameters in their own dtype through the casts.

    Raises:
        TypeError / ValueError on bad dtypes, shapes, devices or labels (see the module docstring
        for labels on CUDA), ``BackendUnavailableError`` when a chosen backend cannot run.
    """
    loss, _ = _masked_lm_loss(hidden, weight, bias, labels, ignore_index, chunk_bytes, False)
    return loss
