"""The robrank readings of GTM and LTM that scripts/bench_ers_definitions.py measures: GTM's target is what
robrank's ``argrank[i, mask_unmatch[i]].argmin()`` returns, read as a gallery index; LTM keeps the query's own
item in the same-class minimum, and otherwise equals ours."""
import torch
import torch.nn.functional as F

from scripts.bench_ers_definitions import _robrank_gtm_target, _robrank_ltm
from serving.runtime.attacks.ranking import RANK_OBJECTIVES, select_targets


def _gallery(n=40, d=8, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(n, d, generator=g), dim=1)
    labels = torch.randint(0, classes, (n,), generator=g)
    return emb, labels


def test_robrank_gtm_target_is_the_unmatching_items_position_read_as_a_gallery_index():
    gallery, labels = _gallery()
    self_idx = torch.tensor([0, 5, 17, 33])
    t = select_targets("GTM", gallery[self_idx], self_idx, labels[self_idx], gallery, labels)
    got = _robrank_gtm_target(t)
    d = torch.cdist(gallery[self_idx], gallery)
    d[torch.arange(4), self_idx] = 1e38  # robrank's _sel_gtm, row by row
    argsort = d.argsort(dim=1)
    argrank = argsort.argsort(dim=1)
    unmatch = labels.view(1, -1) != labels[argsort[:, 0]].view(-1, 1)
    want = torch.stack([argrank[i, unmatch[i]].argmin() for i in range(4)])
    assert torch.equal(got, want)
    # ours is the nearest unmatching item itself, which robrank's index is only by chance
    assert torch.equal(t.target, torch.stack([unmatch[i].nonzero().view(-1)[want[i]] for i in range(4)]))
    assert (got != t.target).sum() >= 3


def test_robrank_ltm_keeps_the_query_itself_in_the_same_class_minimum():
    gallery, labels = _gallery()
    self_idx = torch.tensor([3, 9])
    t = select_targets("LTM", gallery[self_idx], self_idx, labels[self_idx], gallery, labels)
    e = gallery[self_idx]  # at the clean start the nearest same-class item is the query's own copy
    far_other = torch.stack([torch.cdist(e[i:i + 1], gallery[labels != labels[j]]).max()
                             for i, j in enumerate(self_idx)])
    assert torch.allclose(_robrank_ltm(e, t), -far_other, atol=1e-4)
    # ours leaves the copy out, so its same-class minimum is larger and its objective larger
    assert (RANK_OBJECTIVES["LTM"](e, t) > _robrank_ltm(e, t) + 1e-3).all()
