"""Dynamic masked-language-model masking on the device (RoBERTa's recipe).

Every call draws a fresh mask, so each epoch sees different masked positions. The statistics are
those of Hugging Face's ``DataCollatorForLanguageModeling``: each maskable token is selected with
probability ``mlm_probability``; a selected token becomes the mask token with probability 0.8, a
uniformly random token id with probability 0.1, and stays unchanged with probability 0.1. Special
and padding tokens are never selected. Labels hold the original id at selected positions and
``-100`` (ignored by the loss) everywhere else.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["dynamic_mask", "DynamicMaskingCollator", "IGNORE_INDEX"]

IGNORE_INDEX = -100


def _check_int_tensor(name: str, t: Any) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")


def dynamic_mask(input_ids: torch.Tensor, *, mask_token_id: int, vocab_size: int,
                 special_tokens_mask: torch.Tensor | None = None, mlm_probability: float = 0.15,
                 generator: torch.Generator | None = None, pad_token_id: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask ``input_ids`` for MLM training, on the tensor's own device.

    Args:
        input_ids: integer tensor of any shape (usually ``[B, L]``); not modified.
        mask_token_id: the id that replaces 80% of the selected tokens.
        vocab_size: random replacements are drawn from ``[0, vocab_size)``.
        special_tokens_mask: optional bool / 0-1 tensor of ``input_ids``' shape; True marks tokens
            that must never be masked (``<s>``, ``</s>``, ...).
        mlm_probability: the chance that a maskable token is selected, in ``[0, 1]``.
        generator: optional ``torch.Generator`` on ``input_ids``' device, for reproducible masks.
        pad_token_id: tokens equal to it are never masked.

    Returns:
        ``(masked_input_ids, labels)``, both of ``input_ids``' shape and dtype; ``labels`` is
        ``-100`` wherever no prediction is wanted.
    """
    _check_int_tensor("input_ids", input_ids)
    vocab_size = int(vocab_size)
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if not 0 <= int(mask_token_id) < vocab_size:
        raise ValueError(f"mask_token_id={mask_token_id} is outside the vocabulary [0, {vocab_size})")
    mlm_probability = float(mlm_probability)
    if not 0.0 <= mlm_probability <= 1.0:
        raise ValueError(f"mlm_probability must be in [0, 1], got {mlm_probability}")
    if generator is not None and torch.device(generator.device).type != input_ids.device.type:
        raise ValueError(f"generator is on {generator.device} but input_ids is on "
                         f"{input_ids.device}; make the generator on the tensors' device")

    maskable = torch.ones_like(input_ids, dtype=torch.bool)
    if special_tokens_mask is not None:
        if not isinstance(special_tokens_mask, torch.Tensor):
            raise TypeError("special_tokens_mask must be a torch.Tensor")
        if special_tokens_mask.shape != input_ids.shape:
            raise ValueError(f"special_tokens_mask has shape {tuple(special_tokens_mask.shape)}, "
                             f"input_ids has {tuple(input_ids.shape)}")
        if special_tokens_mask.is_floating_point():
            raise TypeError("special_tokens_mask must be bool or integer (1 = special)")
        maskable &= ~special_tokens_mask.to(device=input_ids.device, dtype=torch.bool)
    if pad_token_id is not None:
        maskable &= input_ids != int(pad_token_id)

    device = input_ids.device
    selected = (torch.rand(input_ids.shape, device=device, generator=generator)
                < mlm_probability) & maskable
    # One uniform draw splits the selected tokens 80 / 10 / 10.
    action = torch.rand(input_ids.shape, device=device, generator=generator)
    to_mask = selected & (action < 0.8)
    to_random = selected & (action >= 0.8) & (action < 0.9)
    random_ids = torch.randint(0, vocab_size, input_ids.shape, device=device, generator=generator,
                               dtype=input_ids.dtype)

    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    masked = torch.where(to_mask, torch.full_like(input_ids, int(mask_token_id)), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


class DynamicMaskingCollator:
    """Pad a list of examples and mask them dynamically: a ``collate_fn`` for ``DataLoader``.

    Each example is a mapping with ``input_ids`` (a list or 1-D tensor of ids; an optional
    ``special_tokens_mask`` of the same length is honoured; ``labels`` are replaced), or the ids
    themselves. Returns a dict of ``input_ids``, ``attention_mask`` and ``labels`` (int64
    ``[B, L]``, right-padded), the form ``transformers.Trainer`` passes to a model.

    Args:
        mask_token_id, vocab_size, mlm_probability: as in :func:`dynamic_mask`.
        pad_token_id: the id used for padding (never masked).
        special_token_ids: ids that are never masked (``<s>``, ``</s>``, ...).
        pad_to_multiple_of: round the padded length up to a multiple of this.
        generator: optional CPU ``torch.Generator`` for reproducible masks.
    """

    def __init__(self, *, mask_token_id: int, vocab_size: int, pad_token_id: int,
                 special_token_ids: Iterable[int] = (), mlm_probability: float = 0.15,
                 pad_to_multiple_of: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        self.mask_token_id = int(mask_token_id)
        self.vocab_size = int(vocab_size)
        self.pad_token_id = int(pad_token_id)
        self.special_token_ids = tuple(int(t) for t in special_token_ids)
        self.mlm_probability = float(mlm_probability)
        if pad_to_multiple_of is not None and int(pad_to_multiple_of) <= 0:
            raise ValueError(f"pad_to_multiple_of must be positive, got {pad_to_multiple_of}")
        self.pad_to_multiple_of = pad_to_multiple_of
        self.generator = generator
        # Checks the arguments once, up front, instead of on the first batch.
        dynamic_mask(torch.zeros(1, 1, dtype=torch.long), mask_token_id=self.mask_token_id,
                     vocab_size=self.vocab_size, mlm_probability=self.mlm_probability)

    @staticmethod
    def _ids(example: Any, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        special = None
        if isinstance(example, Mapping):
            if "input_ids" not in example:
                raise KeyError(f"example {index} has no 'input_ids' (keys: {sorted(example)})")
            ids, special = example["input_ids"], example.get("special_tokens_mask")
        else:
            ids = example
        if not isinstance(ids, torch.Tensor):
            if not isinstance(ids, Sequence):
                raise TypeError(f"example {index}: input_ids must be a list or tensor of ints, got "
                                f"{type(ids).__name__}")
            ids = torch.tensor(list(ids), dtype=torch.long)
        if ids.dim() != 1:
            raise ValueError(f"example {index}: input_ids must be 1-D, got shape {tuple(ids.shape)}")
        _check_int_tensor(f"example {index} input_ids", ids)
        if special is not None:
            special = torch.as_tensor(special, dtype=torch.bool)
            if special.shape != ids.shape:
                raise ValueError(f"example {index}: special_tokens_mask length {special.numel()} "
                                 f"!= input_ids length {ids.numel()}")
        return ids.long().cpu(), special

    def __call__(self, examples: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Pad and mask ``examples``; returns ``input_ids``, ``attention_mask`` and ``labels``."""
        if len(examples) == 0:
            raise ValueError("cannot collate an empty list of examples")
        parsed = [self._ids(ex, i) for i, ex in enumerate(examples)]
        length = max(ids.numel() for ids, _ in parsed)
        if self.pad_to_multiple_of:
            m = int(self.pad_to_multiple_of)
            length = (length + m - 1) // m * m
        batch = len(parsed)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(batch, length, dtype=torch.long)
        special = torch.zeros(batch, length, dtype=torch.bool)
        for row, (ids, spec) in enumerate(parsed):
            n = ids.numel()
            input_ids[row, :n] = ids
            attention_mask[row, :n] = 1
            if spec is not None:
                special[row, :n] = spec
        special[attention_mask == 0] = True
        if self.special_token_ids:
            special |= torch.isin(input_ids, torch.tensor(self.special_token_ids))
        masked, labels = dynamic_mask(input_ids, mask_token_id=self.mask_token_id,
                                      vocab_size=self.vocab_size, special_tokens_mask=special,
                                      mlm_probability=self.mlm_probability,
                                      generator=self.generator, pad_token_id=self.pad_token_id)
        return {"input_ids": masked, "attention_mask": attention_mask, "labels": labels}
