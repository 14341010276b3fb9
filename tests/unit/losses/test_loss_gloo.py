"""Real data parallelism: 2 gloo processes (gather with grad + loss + gradients averaged over ranks) give the same
loss and parameter gradients as one process on the whole batch, for every family in one spawn; and feature-cache
accumulation (2 ranks x 2 micro-batches) gives the gradient of one process on the whole batch."""

import json
import socket

import torch.multiprocessing as mp

from loss_testing import CASES, gloo_worker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one_process(tmp_path):
    out = tmp_path / "results.json"
    mp.spawn(gloo_worker, args=(2, free_port(), str(out), CASES), nprocs=2, join=True)
    results = json.loads(out.read_text())
    assert sorted(results) == sorted([c["id"] for c in CASES] + ["feature_cache_clip", "feature_cache_sdm"])
    for cid, r in results.items():
        assert abs(r["loss"][0] - r["loss"][1]) <= 1e-6 * max(1.0, abs(r["loss"][1])), (cid, r)
        assert r["term_diff"] <= 1e-6 * max(1.0, abs(r["loss"][1])), (cid, r)
        assert r["grad_diff"] <= 1e-6 * max(1.0, r["grad_norm"]), (cid, r)
        assert r["grad_norm"] > 1e-3, (cid, r)  # the comparison is not vacuous
