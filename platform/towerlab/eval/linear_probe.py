"""Linear probe: a logistic regression (scikit-learn) on frozen image features, as in the CLIP paper's and
CLIP_benchmark's linear-probe evaluations. The inverse regularisation C is chosen on a held-out part of the train
features, then the probe is refit on all of them and scored on the test features: top-K accuracy and
mean_per_class_recall (balanced accuracy), the same names as the zeroshot evaluator on benchmark data.
"""

from __future__ import annotations

import numpy as np

# C on a log grid, as the CLIP paper's search spans (1e-6 .. 1e6); a coarse grid keeps the fits few
C_GRID = tuple(10.0**e for e in range(-4, 5))


def _fit(x: np.ndarray, y: np.ndarray, c: float):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=1000).fit(x, y)


def _scores(model, x: np.ndarray, y: np.ndarray, n_classes: int, ks: tuple[int, ...]) -> dict[str, float]:
    proba = np.zeros((len(x), n_classes))
    proba[:, model.classes_] = model.predict_proba(x)  # classes missing from train never win
    order = np.argsort(-proba, axis=1, kind="stable")
    out = {f"top{k}": float(np.mean(np.any(order[:, :k] == y[:, None], axis=1))) for k in ks}
    # balanced accuracy (sklearn's balanced_accuracy_score, without its warning for classes only predicted)
    present = np.unique(y)
    out["mean_per_class_recall"] = float(np.mean([np.mean(order[y == c, 0] == c) for c in present]))
    return out


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 ks: tuple[int, ...] = (1, 5), heldout: float = 0.2, seed: int = 0,
                 grid: tuple[float, ...] = C_GRID) -> tuple[dict[str, float], float]:
    """(test metrics, the chosen C). `heldout` of the train rows (a seeded permutation) choose C by top-1."""
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    order = np.random.default_rng(seed).permutation(len(train_x))
    n_val = max(1, int(round(heldout * len(train_x))))
    val, fit = order[:n_val], order[n_val:]
    best, best_c = -1.0, grid[0]
    if len(np.unique(train_y[fit])) > 1:
        for c in grid:
            top1 = _scores(_fit(train_x[fit], train_y[fit], c), train_x[val], train_y[val], n_classes, (1,))["top1"]
            if top1 > best:  # ties keep the smaller C, the stronger regularisation
                best, best_c = top1, c
    return _scores(_fit(train_x, train_y, best_c), test_x, test_y, n_classes, ks), best_c
