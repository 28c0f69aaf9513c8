"""roberta_fast: hand-written Triton, CUDA C++ and CPU kernels that make RoBERTa fast.

Public API::

    roberta_fast.patch(model, ...)          # swap the fast modules into a Hugging Face model
    roberta_fast.unpatch(model)             # and back
    roberta_fast.available_backends()       # {"cuda": "ok" | why not, "triton": ..., ...}
    with roberta_fast.use_backend("triton"): ...   # or env ROBERTA_FAST_BACKEND
    roberta_fast.ops.fused_residual_layer_norm / attention / attention_varlen / masked_lm_loss
"""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import backends
from .backends import BackendUnavailableError, available_backends, use_backend

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "use_backend",
    "backends",
    "ops",
    "patch",
    "unpatch",
]

# Loading the extension registers the torch.ops.roberta_fast.* native ops (when it is built).
backends.native_module()

from . import ops  # noqa: E402
# The functions shadow their module's name on the package; transformers loads on first use.
from .patch import patch, unpatch  # noqa: E402
