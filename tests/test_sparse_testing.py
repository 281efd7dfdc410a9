"""The random sparse-decode inputs: widths of the chosen layout, an optional extra cache
with its own page size and indices, and NaN bytes in every cache token no index uses
(for MODEL1 both the token's row and its scale row), so that a kernel reading one shows."""

import pytest
import torch

from flashmla_cute import fp8_cache
from flashmla_cute.fp8_cache import MODEL1, V32
from flashmla_cute.sparse_testing import NAN_BYTE, make_sparse_decode_inputs

LAYOUTS = pytest.mark.parametrize("layout", [V32, MODEL1], ids=lambda layout: layout.name)


def bytes_of_every_token(cache, layout):
    """uint8 ``[num_blocks * page_size, n]``: each token's bytes (for MODEL1 its row, then its scale row)."""
    num_blocks, page_size = cache.shape[:2]
    if layout is V32:
        return cache.view(torch.uint8).reshape(num_blocks * page_size, -1)
    pages = torch.arange(num_blocks)[:, None].expand(num_blocks, page_size)
    slots = torch.arange(page_size)[None, :].expand(num_blocks, page_size)
    rows, scales = fp8_cache.model1_token_bytes(cache, pages, slots)
    return torch.cat([rows, scales], dim=-1).flatten(0, 1)


def used_tokens(indices, topk_length, num_tokens):
    """bool ``[num_tokens]``: the tokens some valid entry names."""
    valid = indices >= 0
    if topk_length is not None:
        valid &= torch.arange(indices.shape[-1]) < topk_length[:, None, None]
    used = torch.zeros(num_tokens, dtype=torch.bool)
    used[indices[valid].long()] = True
    return used


@LAYOUTS
def test_widths_follow_the_layout(layout):
    inp = make_sparse_decode_inputs(2, 3, 8, 100, 64, 16, seed=0, layout=layout)
    assert inp.q.shape == (2, 3, 8, layout.head_dim) and inp.q.dtype == torch.bfloat16
    assert inp.k_cache.shape[1:] == (16, 1, layout.bytes_per_token) and inp.k_cache.dtype == torch.float8_e4m3fn
    assert fp8_cache.layout_of(inp.k_cache) is layout
    assert inp.softmax_scale == layout.head_dim ** -0.55
    assert inp.extra_k_cache is None and inp.extra_indices is None and inp.extra_topk_length is None


@LAYOUTS
@pytest.mark.parametrize("with_topk_length", [False, True])
def test_every_token_no_index_uses_holds_nan_bytes(layout, with_topk_length):
    inp = make_sparse_decode_inputs(3, 2, 4, 100, 64, 5, seed=1, layout=layout, extra_topk=64, extra_page_size=3,
                                    with_topk_length=with_topk_length, with_extra_topk_length=with_topk_length)
    for cache, indices, topk_length in ((inp.k_cache, inp.indices, inp.topk_length),
                                        (inp.extra_k_cache, inp.extra_indices, inp.extra_topk_length)):
        tokens = bytes_of_every_token(cache, layout)
        used = used_tokens(indices, topk_length, len(tokens))
        assert 0 < int(used.sum()) < len(tokens)
        assert bool((tokens[~used] == NAN_BYTE).all())
        keys = fp8_cache.dequantize_tokens(cache, layout, torch.arange(len(tokens)) // cache.shape[1],
                                           torch.arange(len(tokens)) % cache.shape[1])
        assert bool(keys[~used].isnan().all()) and bool(keys[used].isfinite().all())


def test_extra_cache_has_its_own_pages_and_indices():
    inp = make_sparse_decode_inputs(4, 2, 8, 100, 64, 16, seed=2, layout=MODEL1, extra_topk=128, extra_page_size=3,
                                    with_extra_topk_length=True, varlen=False)
    assert inp.extra_k_cache.shape[1:] == (3, 1, fp8_cache.MODEL1_BYTES_PER_TOKEN)
    assert fp8_cache.layout_of(inp.extra_k_cache) is MODEL1
    assert inp.extra_indices.shape == (4, 2, 128) and inp.extra_indices.dtype == torch.int32
    assert inp.extra_topk_length.shape == (4,) and inp.extra_topk_length.dtype == torch.int32
    assert 0 <= int(inp.extra_topk_length.min()) and int(inp.extra_topk_length.max()) <= 128
    assert inp.topk_length is None
    # extra_seqlen defaults to 2 * extra_topk: every index valid, all distinct.
    num_extra_tokens = inp.extra_k_cache.shape[0] * 3
    assert bool(((inp.extra_indices >= 0) & (inp.extra_indices < num_extra_tokens)).all())
    for row in inp.extra_indices.flatten(0, 1):
        assert len(set(row.tolist())) == 128


def test_all_invalid_empties_both_caches():
    inp = make_sparse_decode_inputs(2, 1, 4, 100, 64, 8, seed=3, layout=MODEL1, extra_topk=64, all_invalid=True)
    assert bool((inp.indices == -1).all()) and bool((inp.extra_indices == -1).all())


def test_extra_options_need_extra_topk():
    with pytest.raises(ValueError, match="need extra_topk"):
        make_sparse_decode_inputs(2, 1, 4, 100, 64, 8, layout=MODEL1, extra_page_size=2)
