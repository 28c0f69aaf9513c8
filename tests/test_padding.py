"""unpad_input / pad_input: round trip, cu_seqlens, gradients, bad input."""
import pytest
import torch

from roberta_fast.nn.padding import pad_input, unpad_input
from tests.helpers import randn


def _random_mask(batch, seqlen, *, left=False):
    lengths = torch.randint(0, seqlen + 1, (batch,))
    lengths[0] = seqlen  # one full row
    if batch > 1:
        lengths[1] = min(1, seqlen)  # a length-1 row
    if batch > 2:
        lengths[2] = 0  # a row of all padding
    pos = torch.arange(seqlen)[None, :]
    mask = pos >= (seqlen - lengths[:, None]) if left else pos < lengths[:, None]
    return mask, lengths


@pytest.mark.parametrize("batch,seqlen", [(1, 1), (1, 7), (4, 7), (5, 97), (3, 13)])
@pytest.mark.parametrize("left", [False, True])
def test_round_trip_and_cu_seqlens(batch, seqlen, left):
    mask, lengths = _random_mask(batch, seqlen, left=left)
    hidden = randn(batch, seqlen, 3, 5)
    packed, indices, cu, max_seqlen = unpad_input(hidden, mask)

    assert cu.dtype == torch.int32 and cu.shape == (batch + 1,)
    expected_cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    assert torch.equal(cu.long(), expected_cu)
    assert max_seqlen == int(lengths.max())
    assert packed.shape == (int(lengths.sum()), 3, 5)
    # Row b's real tokens, in order, sit in packed[cu[b]:cu[b+1]].
    for b in range(batch):
        assert torch.equal(packed[cu[b]:cu[b + 1]], hidden[b][mask[b]])

    back = pad_input(packed, indices, batch, seqlen)
    assert back.shape == hidden.shape
    assert torch.equal(back[mask], hidden[mask])
    assert torch.count_nonzero(back[~mask]) == 0


def test_integer_mask_is_accepted():
    hidden = randn(2, 4, 6)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    packed, _, cu, max_seqlen = unpad_input(hidden, mask)
    assert packed.shape == (6, 6) and cu.tolist() == [0, 2, 6] and max_seqlen == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gradients(dtype):
    batch, seqlen, width = 4, 11, 8
    mask, _ = _random_mask(batch, seqlen)
    hidden = randn(batch, seqlen, width, dtype=dtype, requires_grad=True)
    packed, indices, _, _ = unpad_input(hidden, mask)
    weight = randn(packed.shape[0], width, dtype=dtype)
    (packed * weight).sum().backward()
    grad = torch.zeros(batch, seqlen, width, dtype=dtype)
    grad[mask] = weight
    assert torch.equal(hidden.grad, grad)

    packed2 = randn(*packed.shape, dtype=dtype, requires_grad=True)
    out = pad_input(packed2, indices, batch, seqlen)
    upstream = randn(batch, seqlen, width, dtype=dtype)
    (out * upstream).sum().backward()
    assert torch.equal(packed2.grad, upstream[mask])


def test_gradcheck_float64():
    mask, _ = _random_mask(3, 5)
    hidden = randn(3, 5, 2, dtype=torch.float64, requires_grad=True)

    def fn(h):
        packed, indices, _, _ = unpad_input(h, mask)
        return pad_input(packed.sin(), indices, 3, 5)

    assert torch.autograd.gradcheck(fn, (hidden,))


def test_all_padding_batch():
    hidden = randn(2, 3, 4)
    packed, indices, cu, max_seqlen = unpad_input(hidden, torch.zeros(2, 3, dtype=torch.bool))
    assert packed.shape == (0, 4) and indices.numel() == 0 and max_seqlen == 0
    assert cu.tolist() == [0, 0, 0]
    assert torch.count_nonzero(pad_input(packed, indices, 2, 3)) == 0


def test_bad_input():
    hidden = randn(2, 3, 4)
    with pytest.raises(ValueError, match="shape"):
        unpad_input(hidden, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool or integer"):
        unpad_input(hidden, torch.ones(2, 3))
    with pytest.raises(ValueError, match="at least 2 dims"):
        unpad_input(randn(3), torch.ones(3, dtype=torch.bool))
    packed, indices, _, _ = unpad_input(hidden, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="rows"):
        pad_input(packed[:-1], indices, 2, 3)
    with pytest.raises(ValueError, match="1-D int64"):
        pad_input(packed, indices.float(), 2, 3)
