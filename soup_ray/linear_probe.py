"""The linear-probe head (LP of LP-FT): logistic regression on the frozen image features of the train split.

Fitted once before the sweep: the image tower is frozen, its L2-normalised
features of the train split feed a multinomial logistic regression
(scikit-learn, L-BFGS); the inverse regularisation ``C`` is chosen from a
small grid on the held-out split (never on test). The result replaces the
zero-shot head of the base, which is then saved once with its fingerprint as
usual, so every trial starts from the same LP head.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .data import loader
from .model import CLIPClassifier

C_GRID = (0.1, 1.0, 10.0, 100.0)


def image_features(clf: CLIPClassifier, ds: Dataset, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised image features ``[N, D]`` and labels ``[N]`` of a split (frozen tower, inference mode)."""
    feats, labels = [], []
    clf.eval()
    with torch.inference_mode():
        for x, y in loader(ds, batch_size):
            feats.append(clf.features(x).float().cpu().numpy())
            labels.append(y.numpy())
    return np.concatenate(feats), np.concatenate(labels)


def fit_linear_probe(
    clf: CLIPClassifier,
    train: Dataset,
    heldout: Dataset,
    batch_size: int = 256,
    c_grid: Sequence[float] = C_GRID,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit the probe, copy it into ``clf.head`` and return what was chosen (C, held-out accuracy per C)."""
    from sklearn.linear_model import LogisticRegression

    xt, yt = image_features(clf, train, batch_size)
    xh, yh = image_features(clf, heldout, batch_size)
    n_classes = clf.head.out_features
    tried: dict[str, float] = {}
    best: tuple[float, float, Any] | None = None
    for c in c_grid:
        model = LogisticRegression(C=float(c), max_iter=2000, random_state=seed)
        model.fit(xt, yt)
        acc = float((model.predict(xh) == yh).mean())
        tried[f"{c:g}"] = acc
        if best is None or acc > best[0]:
            best = (acc, float(c), model)
    assert best is not None
    acc, c, model = best
    weight = np.zeros((n_classes, xt.shape[1]), dtype=np.float32)
    bias = np.full((n_classes,), -1e4, dtype=np.float32)  # a class absent from the train split is never predicted
    classes = model.classes_.astype(int)
    if len(classes) == 2 and n_classes >= 2:  # scikit-learn's binary case has one row: class 1 against class 0
        weight[classes[1]], bias[classes[1]] = model.coef_[0], model.intercept_[0]
        weight[classes[0]], bias[classes[0]] = 0.0, 0.0
    else:
        weight[classes], bias[classes] = model.coef_, model.intercept_
    with torch.no_grad():
        clf.head.weight.copy_(torch.from_numpy(weight))
        clf.head.bias.copy_(torch.from_numpy(bias))
    return {"C": c, "heldout_accuracy_by_C": tried, "heldout_accuracy": acc, "train_images": int(len(yt))}
