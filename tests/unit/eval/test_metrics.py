import torch
import torch.nn.functional as F

from towerlab.eval import class_embeddings, recall_at_k, topk_accuracy


def test_zeroshot_matches_loop():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(40, 8, generator=g), dim=1)
    prompts = F.normalize(torch.randn(5 * 3, 8, generator=g), dim=1)
    labels = torch.randint(0, 5, (40,), generator=g)
    cls = class_embeddings(prompts, 3)
    got = topk_accuracy(img, cls, labels, ks=(1, 3))
    top1 = top3 = 0
    for i in range(40):
        scores = []
        for c in range(5):
            mean = sum(prompts[c * 3 + j] for j in range(3)) / 3
            scores.append(float(img[i] @ (mean / mean.norm())))
        order = sorted(range(5), key=lambda c: -scores[c])
        top1 += order[0] == labels[i]
        top3 += labels[i] in order[:3]
    assert abs(got["top1"] - int(top1) / 40) < 1e-6 and abs(got["top3"] - top3 / 40) < 1e-6


def test_recall_hand_example():
    img = torch.eye(3)
    txt = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]])  # 1 and 2 swapped
    out = recall_at_k(img, txt, torch.arange(3), ks=(1, 2), chunk=2)
    assert abs(out["recall_at_1_i2t"] - 1 / 3) < 1e-9 and abs(out["recall_at_1_t2i"] - 1 / 3) < 1e-9
    # duplicate captions: if items 1 and 2 share a caption, retrieving either is a hit
    out = recall_at_k(img, txt, torch.tensor([0, 1, 1]), ks=(1,))
    assert out["recall_at_1_i2t"] == 1.0


def _naive_ranks(q, k, qg, kg):
    """Rank of each query's best-scoring correct key, by sorting every row (ties broken towards the hit)."""
    ranks = []
    for i in range(q.shape[0]):
        scores = (k @ q[i]).tolist()
        best = max(s for s, g in zip(scores, kg.tolist()) if g == qg[i])
        ranks.append(1 + sum(s > best for s in scores))
    return ranks


def test_retrieval_recall_and_median_rank_match_sorting():
    import numpy as np

    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(57, 6, generator=g), dim=1)
    txt = F.normalize(img + 0.8 * torch.randn(57, 6, generator=g), dim=1)
    groups = torch.randint(0, 40, (57,), generator=g)  # some shared captions
    out = recall_at_k(img, txt, groups, ks=(1, 5, 10), chunk=8)
    for direction, (q, k) in {"i2t": (img, txt), "t2i": (txt, img)}.items():
        ranks = np.array(_naive_ranks(q, k, groups, groups))
        for K in (1, 5, 10):
            assert abs(out[f"recall_at_{K}_{direction}"] - (ranks <= K).mean()) < 1e-9
        assert out[f"median_rank_{direction}"] == float(np.median(ranks))
    assert out["median_rank_i2t"] > 1  # the noisy pairs are not all retrieved first: the check above is not trivial
    assert recall_at_k(img, txt, groups, chunk=1000) == recall_at_k(img, txt, groups, chunk=7)
