"""An independent judge of digit samples: scikit-learn's SVC on the real 8x8 digits.

Independent of everything ptqd ships (it never sees the classifier in the model folder):
samples are scaled back to 8x8 by 2x2 averaging and classified.
"""
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=1)
def judge():
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    digits = load_digits()
    x, y = digits.data / 16.0, digits.target
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    train, test = order[:1400], order[1400:]
    clf = SVC(gamma=0.05, C=10).fit(x[train], y[train])
    return clf, float((clf.predict(x[test]) == y[test]).mean()), x


def to_8x8(images: np.ndarray) -> np.ndarray:
    n = len(images)
    return images.reshape(n, 8, 2, 8, 2).mean(axis=(2, 4)).reshape(n, 64)


def nearest_real_distance(flat: np.ndarray, real: np.ndarray) -> np.ndarray:
    d2 = (flat**2).sum(1)[:, None] - 2 * flat @ real.T + (real**2).sum(1)[None]
    return np.sqrt(np.maximum(d2.min(axis=1), 0))
