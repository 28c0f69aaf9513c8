"""The ops: input checks, backend dispatch, autograd and fake (meta) implementations.

Each op lives in its own module under the same stem as its kernels (``csrc/cpu/<stem>.cpp``,
``csrc/cuda/<stem>.cu``, ``roberta_fast/triton/<stem>.py``)."""

from .masked_lm_loss import gather_labelled, masked_lm_loss  # noqa: E402

__all__ = ["gather_labelled", "masked_lm_loss"]
