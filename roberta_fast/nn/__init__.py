"""Drop-in modules. Each fast class subclasses the Hugging Face class it replaces, so an existing
instance is converted in place (``Fast*.convert(module)``): parameters keep their identity and
``state_dict`` keys are unchanged. ``roberta_fast.patch`` does this for a whole model."""
from .layer_norm_residual import (FastBertOutput, FastBertSelfOutput, FastRobertaOutput,  # noqa: F401
                                  FastRobertaSelfOutput, FastXLMRobertaOutput,
                                  FastXLMRobertaSelfOutput, FusedResidualLayerNorm)
from .masked_lm_loss import (FastBertForMaskedLM, FastRobertaForMaskedLM,  # noqa: F401
                             FastXLMRobertaForMaskedLM, MaskedLMHead, MaskedLMPredictionHead,
                             XLMRobertaMaskedLMHead)
