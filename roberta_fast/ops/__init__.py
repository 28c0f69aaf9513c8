"""The ops: input checks, backend dispatch, autograd and fake (meta) implementations.

Each op lives in its own module under the same stem as its kernels (``csrc/cpu/<stem>.cpp``,
``csrc/cuda/<stem>.cu``, ``roberta_fast/triton/<stem>.py``)."""

from .attention import attention, attention_varlen  # noqa: E402
from .layer_norm_residual import fused_residual_layer_norm  # noqa: E402
from .masked_lm_loss import gather_labelled, masked_lm_loss  # noqa: E402

__all__ = ["attention", "attention_varlen", "fused_residual_layer_norm", "gather_labelled",
           "masked_lm_loss"]
