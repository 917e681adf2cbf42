"""k-sparse probing: how much of a label can be read from k latents (or k raw dimensions) of a layer.

**Selection rule** (training split only). For a class c, every column f gets the standardised mean
difference ``|mean(x_f | y = c) - mean(x_f | y != c)| / std(x_f)`` (std over all training rows; a constant
column scores 0), and the k highest-scoring columns are kept (ties: lower index first). Multiclass labels are
probed one-vs-rest: each class gets its own k columns and its own binary logistic regression, and a row is
assigned the class whose probe gives the largest decision value (log-odds), so a k-sparse multiclass probe
reads at most ``k * n_classes`` columns. A binary label (two classes) is one probe for its second class in
sorted order (``"1"`` for ``"0"/"1"`` labels).

**Fit.** Selected columns are standardised with training statistics; scikit-learn ``LogisticRegression``
(lbfgs, L2) is fitted for each C in `CS`; the C with the best dev accuracy is kept (ties: smaller C), and its
test accuracy and macro-F1 are reported. Classes with fewer than ``min_class_count`` training rows are dropped
from every split (counted in the result). Deterministic: the optional training subsample uses ``seed``, and
lbfgs is deterministic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

KS = (1, 2, 5, 10, 20)
CS = (0.01, 0.1, 1.0, 10.0, 100.0)


def _dense(X) -> np.ndarray:
    return X.toarray() if hasattr(X, "toarray") else np.asarray(X)


def column_moments(X) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation ``[F]`` of each column of a dense or sparse ``[N, F]`` matrix."""
    n = X.shape[0]
    mean = np.asarray(X.sum(axis=0), dtype=np.float64).ravel() / n
    sq = X.multiply(X).sum(axis=0) if hasattr(X, "multiply") else np.square(X, dtype=np.float64).sum(axis=0)
    var = np.asarray(sq, dtype=np.float64).ravel() / n - mean ** 2
    return mean, np.sqrt(np.clip(var, 0.0, None))


def class_scores(X, y: np.ndarray, classes: list) -> np.ndarray:
    """``[C, F]`` standardised one-vs-rest mean differences (the selection criterion, module docstring)."""
    n = X.shape[0]
    mean, std = column_moments(X)
    Y = np.stack([(y == c) for c in classes], axis=1).astype(np.float64)  # [N, C]
    sums = np.asarray(X.T @ Y if hasattr(X, "toarray") else X.T.astype(np.float64) @ Y).T  # [C, F]
    cnt = Y.sum(axis=0)[:, None]
    mean_in = sums / np.maximum(cnt, 1)
    mean_out = (mean[None, :] * n - sums) / np.maximum(n - cnt, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.abs(mean_in - mean_out) / std[None, :]
    return np.where(std[None, :] > 0, s, 0.0)


def top_k(scores_F: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, ties broken by lower index."""
    order = np.lexsort((np.arange(len(scores_F)), -scores_F))
    return order[:k]


@dataclass
class ProbeResult:
    """One k-sparse probe of one label."""

    k: int
    C: float
    dev_acc: float
    test_acc: float
    test_macro_f1: float
    majority_acc: float
    """Test accuracy of always predicting the most frequent training class."""
    classes: list
    latents: dict = field(default_factory=dict)
    """Class (the positive class for a binary label) -> selected column indices."""
    n_train: int = 0
    n_dev: int = 0
    n_test: int = 0
    n_dropped: dict = field(default_factory=dict)
    """Rows dropped per split because their class is too rare in training."""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["classes"] = [str(c) for c in self.classes]
        d["latents"] = {str(c): [int(i) for i in v] for c, v in self.latents.items()}
        return d


def sparse_probe(X_train, y_train, X_dev, y_dev, X_test, y_test, ks=KS, Cs=CS, seed: int = 0,
                 min_class_count: int = 10, max_train: int | None = None) -> dict[int, ProbeResult]:
    """k-sparse probes for every k in ``ks`` (module docstring). ``X_*``: ``[N, F]`` dense or sparse features,
    ``y_*``: ``[N]`` labels. Returns ``{k: ProbeResult}``.

    The many small fits run with BLAS limited to one thread: on a busy 2-core machine a threaded BLAS makes
    each ``[N, <=20]`` fit ~10x slower."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return _sparse_probe(X_train, y_train, X_dev, y_dev, X_test, y_test, ks, Cs, seed, min_class_count,
                             max_train)


def _sparse_probe(X_train, y_train, X_dev, y_dev, X_test, y_test, ks, Cs, seed, min_class_count,
                  max_train) -> dict[int, ProbeResult]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    y_train, y_dev, y_test = (np.asarray(y) for y in (y_train, y_dev, y_test))
    if max_train is not None and len(y_train) > max_train:
        keep = np.sort(np.random.default_rng(seed).choice(len(y_train), max_train, replace=False))
        X_train, y_train = X_train[keep], y_train[keep]
    vals, cnts = np.unique(y_train, return_counts=True)
    classes = sorted(v for v, c in zip(vals, cnts) if c >= min_class_count)
    if len(classes) < 2:
        raise ValueError(f"need >= 2 classes with >= {min_class_count} training rows, got {classes}")
    dropped = {}
    splits = {}
    for name, X, y in (("train", X_train, y_train), ("dev", X_dev, y_dev), ("test", X_test, y_test)):
        keep = np.isin(y, classes)
        dropped[name] = int((~keep).sum())
        splits[name] = (X[np.flatnonzero(keep)], y[keep])
    (Xtr, ytr), (Xdv, ydv), (Xte, yte) = splits["train"], splits["dev"], splits["test"]
    binary = len(classes) == 2
    probe_classes = classes[1:] if binary else classes
    scores = class_scores(Xtr, ytr, probe_classes)
    majority = classes[int(np.argmax([np.sum(ytr == c) for c in classes]))]
    out = {}
    for k in ks:
        k_eff = min(k, Xtr.shape[1])
        sel = {c: top_k(scores[i], k_eff) for i, c in enumerate(probe_classes)}
        best = None
        for C in sorted(Cs):
            dec_dev, dec_te = [], []
            for c in probe_classes:
                cols = sel[c]
                A = _dense(Xtr[:, cols]).astype(np.float64)
                mu, sd = A.mean(axis=0), A.std(axis=0)
                sd[sd == 0] = 1.0
                lr = LogisticRegression(C=C, max_iter=2000, random_state=seed)
                lr.fit((A - mu) / sd, (ytr == c).astype(int))
                dec_dev.append(lr.decision_function((_dense(Xdv[:, cols]) - mu) / sd))
                dec_te.append(lr.decision_function((_dense(Xte[:, cols]) - mu) / sd))
            if binary:
                pred_dev = np.where(dec_dev[0] > 0, classes[1], classes[0])
                pred_te = np.where(dec_te[0] > 0, classes[1], classes[0])
            else:
                labels = np.asarray(probe_classes, dtype=object)
                pred_dev = labels[np.argmax(np.stack(dec_dev, axis=1), axis=1)]
                pred_te = labels[np.argmax(np.stack(dec_te, axis=1), axis=1)]
            dev_acc = float(np.mean(pred_dev == ydv)) if len(ydv) else float("nan")
            if best is None or dev_acc > best[0]:
                best = (dev_acc, C, pred_te)
        dev_acc, C, pred_te = best
        out[k] = ProbeResult(
            k=k, C=C, dev_acc=dev_acc, test_acc=float(np.mean(pred_te == yte)) if len(yte) else float("nan"),
            test_macro_f1=float(f1_score(yte, pred_te, labels=classes, average="macro", zero_division=0)),
            majority_acc=float(np.mean(yte == majority)) if len(yte) else float("nan"),
            classes=list(classes), latents={c: sel[c].tolist() for c in probe_classes},
            n_train=len(ytr), n_dev=len(ydv), n_test=len(yte), n_dropped=dropped)
    return out


def probe_ud(feats: dict, label: str, ks=KS, Cs=CS, seed: int = 0, min_class_count: int = 10,
             max_train: int | None = None) -> dict[int, ProbeResult]:
    """`sparse_probe` of UD label ``label`` (`trsae.evals.ud.LABELS`) on ``feats = {"train": UDFeatures,
    "dev": …, "test": …}`` (each from `trsae.evals.ud.ud_features` with the same model, layer and SAE)."""
    return sparse_probe(feats["train"].word_X, feats["train"].labels[label],
                        feats["dev"].word_X, feats["dev"].labels[label],
                        feats["test"].word_X, feats["test"].labels[label],
                        ks=ks, Cs=Cs, seed=seed, min_class_count=min_class_count, max_train=max_train)
