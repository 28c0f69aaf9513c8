"""What the installed transformers release offers, for the tests that patch Hugging Face models."""
from __future__ import annotations

import pytest
import transformers
from transformers.models.roberta.modeling_roberta import RobertaLayer

from roberta_fast.nn.encoder import layers_pass_kwargs
from roberta_fast.patch import patch as _patch

#: Whether encoder layers pass keyword arguments on to their attention, which the unpadded
#: encoder needs (transformers 5.x; 4.x layers take a fixed list).
UNPAD_SUPPORTED = layers_pass_kwargs(RobertaLayer)


def patch(model, **options):
    """``roberta_fast.patch``, or a skip reported as not run when ``unpad=True`` is asked of a
    release whose layers cannot carry it (``patch`` raises there: see test_patch)."""
    if options.get("unpad") and not UNPAD_SUPPORTED:
        pytest.skip(f"NOT RUN: unpad=True needs transformers >= 5.0 "
                    f"(found {transformers.__version__})")
    return _patch(model, **options)
