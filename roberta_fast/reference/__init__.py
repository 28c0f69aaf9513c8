"""Plain-PyTorch references: the oracle for every kernel (ops' ``forward_native``) and a reference
RoBERTa encoder that reproduces Hugging Face's outputs from the same state_dict."""

from .encoder import RobertaReferenceForMaskedLM, RobertaReferenceModel, reference_from_hf

__all__ = ["RobertaReferenceModel", "RobertaReferenceForMaskedLM", "reference_from_hf"]
