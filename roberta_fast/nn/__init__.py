from .layer_norm_residual import (FastBertOutput, FastBertSelfOutput, FastRobertaOutput,  # noqa: F401
                                  FastRobertaSelfOutput, FusedResidualLayerNorm)
