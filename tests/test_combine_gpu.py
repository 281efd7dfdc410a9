"""The combine kernel merges split partial results exactly as log-sum-exp math says."""

import pytest
import torch

from flashmla_cute import scheduler
from flashmla_cute.kernels.combine import COMBINE_FRAGMENT_GROUPS, FRAGS_IN_FLIGHT
from flashmla_cute.launch_args import CombineArgs

pytestmark = pytest.mark.gpu


def torch_merge(o_accum, lse_accum, num_splits, b):
    """Reference merge: out_i = sum_k softmax(lse)_k O_k over sequence i's fragments."""
    outs, lses = [], []
    for i in range(b):
        lo, hi = int(num_splits[i]), int(num_splits[i + 1])
        lse_k = lse_accum[lo:hi].double()  # [n, h_kv, rows]
        lse = torch.logsumexp(lse_k, dim=0)
        w = torch.exp(lse_k - lse)
        w = torch.nan_to_num(w, nan=0.0)
        out = (w.unsqueeze(-1) * o_accum[lo:hi].double()).sum(0)
        lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
        outs.append(out)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


# (lengths, SM parts): sequences of 1-3 fragments each (37 random lengths on 50 parts:
# merged a warp per row), of 7-8 (a thread group per row), and one of more fragments
# than the CTA's thread groups load at once (the groups side by side, in several runs).
LENGTHS = {
    "short": (lambda gen: torch.randint(0, 3000, (37,), generator=gen, dtype=torch.int32), 50),
    "long": (lambda gen: torch.tensor([5000, 4500, 64, 5000, 4000, 0, 4500, 3500], dtype=torch.int32), 50),
    "one very long": (lambda gen: torch.tensor([100000, 64], dtype=torch.int32), 132),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("s_q,h_q,h_kv", [(1, 16, 1), (2, 128, 1), (1, 8, 2)])
@pytest.mark.parametrize("lengths", list(LENGTHS))
def test_combine_matches_torch_merge(requires_hopper, dtype, s_q, h_q, h_kv, lengths):
    from flashmla_cute import runtime

    gen = torch.Generator().manual_seed(1234 + s_q * h_q)
    make_lengths, num_parts = LENGTHS[lengths]
    seqlens = make_lengths(gen)
    b = seqlens.shape[0]
    meta, num_splits = scheduler.plan_torch(seqlens, num_parts)
    hpk = h_q // h_kv
    rows = s_q * hpk
    n_acc = b + num_parts
    dev = "cuda"
    # Partials are stored in the output's dtype (scheduler.PARTIAL_VALUE_BYTES).
    o_accum = torch.randn(n_acc, h_kv, rows, 512, generator=gen).to(dev, dtype)
    lse_accum = (torch.randn(n_acc, h_kv, rows, generator=gen) * 5).to(dev)
    # Some fragments saw no key for some rows, and some rows saw none at all.
    lse_accum[torch.rand(lse_accum.shape, generator=gen).to(dev) < 0.2] = float("-inf")
    lse_accum[:, :, 0] = float("-inf")
    o_accum[torch.isneginf(lse_accum)] = 0.0
    meta, num_splits = meta.to(dev), num_splits.to(dev)
    sentinel = 7.0
    out = torch.full((b, s_q, h_q, 512), sentinel, dtype=dtype, device=dev)
    lse = torch.full((b, h_q, s_q), sentinel, dtype=torch.float32, device=dev)

    accum = torch.cat([o_accum.flatten().view(torch.float32), lse_accum.flatten()])  # the decode kernel's workspace
    assert accum.numel() == scheduler.accumulator_elems(n_acc, h_kv, rows, 512)
    runtime.combine_fn(dtype, 512)(*CombineArgs(accum=accum, meta=meta, num_splits=num_splits, o=out, lse=lse,
                                                heads_per_kv=hpk))
    torch.cuda.synchronize()

    ref_out, ref_lse = torch_merge(o_accum.cpu(), lse_accum.cpu(), num_splits.cpu(), b)
    # [b, h_kv, rows(s, hpk), dv] -> [b, s_q, h_q, dv]; [b, h_kv, rows] -> [b, h_q, s_q]
    ref_out = ref_out.view(b, h_kv, s_q, hpk, 512).permute(0, 2, 1, 3, 4).reshape(b, s_q, h_q, 512)
    ref_lse = ref_lse.view(b, h_kv, s_q, hpk).permute(0, 1, 3, 2).reshape(b, h_q, s_q)
    fragments = (num_splits[1:] - num_splits[:-1]).cpu()
    split = fragments > 1
    assert split.any() and (~split).any()
    if lengths == "one very long":
        assert fragments.max() > COMBINE_FRAGMENT_GROUPS * FRAGS_IN_FLIGHT
    torch.testing.assert_close(out.cpu()[split].double(), ref_out[split], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.cpu()[split].double(), ref_lse[split], atol=1e-4, rtol=1e-5)
    # Unsplit sequences belong to the decode kernel: untouched.
    assert (out.cpu()[~split] == sentinel).all()
    assert (lse.cpu()[~split] == sentinel).all()
