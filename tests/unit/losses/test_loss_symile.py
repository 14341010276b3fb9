"""Symile: explicit loops over multilinear inner products with the same permutations, 3 and 4 modalities."""

import math

import torch

import towerlab.losses as L
from loss_testing import make_feats
from towerlab.losses.symile import symile_permutations


def mip(*vs):
    return sum(math.prod(c) for c in zip(*vs))


def naive_symile(fs, t, seed, step):
    n, m = len(fs[0]), len(fs)
    per_anchor = []
    for a in range(m):
        others = [f for i, f in enumerate(fs) if i != a]
        perms = [p.tolist() for p in symile_permutations(n, m, a, seed, step)]
        total = 0.0
        for i in range(n):
            z = [t * mip(fs[a][i], *[o[p[j]] for o, p in zip(others, perms)]) for j in range(n)]
            z[i] = t * mip(fs[a][i], *[o[i] for o in others])
            total += math.log(sum(math.exp(v) for v in z)) - z[i]
        per_anchor.append(total / n)
    return per_anchor


def test_matches_explicit_loops():
    for mods in (["image", "text", "audio"], ["image", "text", "audio", "depth"]):
        f = make_feats(6, 4, mods, seed=91, dtype=torch.float64)
        out = L.build("symile", modalities=mods, seed=3)(f, logit_scale=torch.tensor(20.0, dtype=torch.float64), step=7)
        ref = naive_symile([f[m].detach().tolist() for m in mods], 20.0, 3, 7)
        for m, r in zip(mods, ref):
            assert math.isclose(out[f"loss_{m}"].item(), r, rel_tol=1e-12)
        assert math.isclose(out["loss"].item(), sum(ref) / len(ref), rel_tol=1e-12)


def test_permutations_change_with_the_step_only():
    a = symile_permutations(10, 3, 0, seed=0, step=1)
    b = symile_permutations(10, 3, 0, seed=0, step=1)
    c = symile_permutations(10, 3, 0, seed=0, step=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not all(torch.equal(x, y) for x, y in zip(a, c))
