import pytest
import torch

from rabit import sign_bits


def _signs(k, out, inf, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand(k, out, inf, generator=gen) > 0.5, 1.0, -1.0)


@pytest.mark.parametrize("out,inf", [(1, 1), (5, 7), (16, 32), (63, 33), (129, 100), (17, 577)])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_round_trip(out, inf, k):
    s = _signs(k, out, inf, seed=out * 1000 + inf + k)
    p = sign_bits.pack_signs(s)
    assert p.dtype == torch.uint8 and p.is_contiguous()
    assert tuple(p.shape) == sign_bits.packed_shape(k, out, inf)
    assert p.numel() == sign_bits.packed_nbytes(k, out, inf)
    assert torch.equal(sign_bits.unpack_signs(p, out, inf), s)
    assert sign_bits.check_packed(p, out, inf) == k


def test_layout_definition():
    """bit i of the little-endian word packed[p, t, c, r] is B[p, 16t + r, 32c + i] > 0."""
    k, out, inf = 2, 37, 70
    s = _signs(k, out, inf, seed=1)
    p = sign_bits.pack_signs(s)
    words = p.view(torch.int32).to(torch.int64) & 0xFFFFFFFF            # (k, T, C, 16)
    for (pi, row, col) in [(0, 0, 0), (1, 36, 69), (0, 17, 33), (1, 15, 31), (0, 16, 32), (1, 5, 64)]:
        t, r, c, i = row // 16, row % 16, col // 32, col % 32
        assert bool((words[pi, t, c, r] >> i) & 1) == bool(s[pi, row, col] > 0)
    # padding bits (rows >= out, columns >= in) are +1
    full = sign_bits.unpack_signs(p, sign_bits.padded_out(out), sign_bits.padded_in(inf))
    assert (full[:, out:, :] == 1).all() and (full[:, :, inf:] == 1).all()


def test_inputs_forms():
    s = _signs(2, 9, 40, seed=2)
    p = sign_bits.pack_signs(s)
    assert torch.equal(sign_bits.pack_signs([s[0], s[1]]), p)
    assert torch.equal(sign_bits.pack_signs(s[0]), p[:1])
    # > 0 means +1; 0 and negatives are -1; any real dtype
    x = torch.tensor([[0.5, 0.0, -2.0, 3.0]])
    assert sign_bits.unpack_signs(sign_bits.pack_signs(x), 1, 4).tolist() == [[[1.0, -1.0, -1.0, 1.0]]]
    assert sign_bits.unpack_signs(sign_bits.pack_signs(x.to(torch.bfloat16)), 1, 4).tolist() == [[[1.0, -1.0, -1.0, 1.0]]]
    with pytest.raises(ValueError):
        sign_bits.pack_signs(torch.ones(2, 2, 2, 2))


def test_pack_bits_and_tiles():
    gen = torch.Generator().manual_seed(3)
    bits = torch.rand(3, 5, 21, generator=gen) > 0.5
    pb = sign_bits.pack_bits(bits)
    assert pb.shape == (3, 5, 3)
    assert torch.equal(sign_bits.unpack_bits(pb, 21), bits)
    assert int(sign_bits.pack_bits(torch.tensor([True, False, False, False, False, False, False, True]))) == 0x81
    rm = torch.randint(0, 256, (2, 32, 8), dtype=torch.uint8, generator=gen)
    assert torch.equal(sign_bits.untile_rows(sign_bits.tile_rows(rm)), rm)


def test_shapes():
    assert sign_bits.padded_in(1) == 32 and sign_bits.padded_in(32) == 32 and sign_bits.padded_in(33) == 64
    assert sign_bits.padded_out(1) == 16 and sign_bits.padded_out(129) == 144
    assert sign_bits.packed_shape(2, 4096, 4096) == (2, 256, 128, 16, 4)
    assert sign_bits.packed_nbytes(2, 4096, 4096) == 2 * 4096 * 4096 // 8
    with pytest.raises(ValueError):
        sign_bits.check_packed(torch.zeros(2, 256, 128, 16, 4, dtype=torch.uint8), 4096, 4097)
