from .masked_lm_loss import FastBertForMaskedLM, FastRobertaForMaskedLM, MaskedLMHead, MaskedLMPredictionHead  # noqa: F401
