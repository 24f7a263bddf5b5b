"""Lab 12's exercise checks pass right answers and fail wrong ones and shortcuts; its tour passes."""
from __future__ import annotations

import torch

from labkit.context_expert import lab, ring


def good_merge(o1, l1, o2, l2):
    lse = torch.logaddexp(l1, l2)
    w1 = torch.where(torch.isneginf(l1), torch.zeros_like(l1), torch.exp(l1 - lse))
    w2 = torch.where(torch.isneginf(l2), torch.zeros_like(l2), torch.exp(l2 - lse))
    return o1 * w1[..., None] + o2 * w2[..., None], lse


def test_merge_check():
    assert lab.check_merge(good_merge, seed=0).passed
    assert not lab.check_merge(lambda o1, l1, o2, l2: ((o1 + o2) / 2, torch.maximum(l1, l2)), seed=0).passed
    assert not lab.check_merge(ring.merge_partial, seed=0).passed               # the library's own: refused
    naive = lab.check_merge(lambda o1, l1, o2, l2: (o1 * torch.exp(l1 - torch.logaddexp(l1, l2))[..., None]
                                                    + o2 * torch.exp(l2 - torch.logaddexp(l1, l2))[..., None],
                                                    torch.logaddexp(l1, l2)), seed=0)
    assert naive.passed  # -inf in one half only: exp(-inf - finite) = 0, fine without the guard

    def stub(*a):
        raise NotImplementedError

    assert not lab.check_merge(stub).attempted


def test_split_sizes_check():
    assert lab.check_split_sizes(lambda e, n, ep: torch.bincount(e // (n // ep), minlength=ep).tolist(), seed=0).passed
    assert not lab.check_split_sizes(lambda e, n, ep: torch.bincount(e, minlength=n).tolist()[:ep], seed=0).passed
    assert not lab.check_split_sizes(lambda e, n, ep: [len(e) // ep] * ep, seed=1).passed


def test_tour_passes():
    rows = lab.tour(2)
    assert all(r["ok"] for r in rows), rows
