"""Classical heads on scikit-learn's digits: agreement with sklearn/XGBoost and round trips."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from trainables.fitted_heads import FittedHead, head_from_state
from trainables.heads import fit_head, linear_probe
from trainables.params import CLASSICAL_HEADS

# Small ensembles keep the file fast on 2 cores; digits needs no more for > 90 %.
XGB = {"xgb_n_estimators": 20, "xgb_max_depth": 4}
CASES = {
    "logreg": ("logreg", {}),
    "svm-linear": ("svm", {"svm_kernel": "linear"}),
    "svm-rbf": ("svm", {"svm_kernel": "rbf"}),
    "xgboost": ("xgboost", XGB),
}


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    xtr, xte, ytr, yte = train_test_split(d.data, d.target, test_size=0.3, random_state=0,
                                          stratify=d.target)
    return (torch.tensor(xtr, dtype=torch.float32), torch.tensor(ytr),
            torch.tensor(xte, dtype=torch.float32), torch.tensor(yte))


@pytest.fixture(scope="module")
def heads(digits) -> dict[str, FittedHead]:
    xtr, ytr, _, _ = digits
    return {name: fit_head(kind, xtr, ytr, num_classes=10, **kw)
            for name, (kind, kw) in CASES.items()}


def _sk_pipeline(estimator, x: torch.Tensor, y: torch.Tensor):
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), estimator).fit(x.double().numpy(), y.numpy())


def _binary(digits) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits 3 vs 8 relabelled 0/1, plus held-out 3s and 8s."""
    xtr, ytr, xte, yte = digits
    keep_tr, keep_te = (ytr == 3) | (ytr == 8), (yte == 3) | (yte == 8)
    return xtr[keep_tr], (ytr[keep_tr] == 8).long(), xte[keep_te]


@pytest.mark.parametrize("name", CASES)
def test_each_head_beats_chance_by_far_on_held_out_digits(name, heads, digits):
    _, _, xte, yte = digits
    scores = heads[name].scores(xte)
    assert scores.shape == (len(xte), 10) and scores.dtype == torch.float32
    assert (scores.argmax(1) == yte).float().mean() >= 0.6


def test_logreg_equals_sklearn_pipeline_predict_proba(heads, digits):
    from sklearn.linear_model import LogisticRegression

    xtr, ytr, xte, _ = digits
    ref = _sk_pipeline(LogisticRegression(C=1.0, max_iter=1000, random_state=0), xtr, ytr)
    expected = ref.predict_proba(xte.double().numpy())
    np.testing.assert_allclose(heads["logreg"].scores(xte).numpy(), expected, atol=1e-4)
    assert heads["logreg"].probabilistic
    assert heads["logreg"].num_params == 10 * 64 + 10
    assert heads["logreg"].macs_per_image == 10 * 64


def _check_svm(head: FittedHead, kernel: str, x: torch.Tensor, y: torch.Tensor,
               xte: torch.Tensor) -> None:
    from sklearn.svm import SVC

    ref = _sk_pipeline(SVC(kernel=kernel, decision_function_shape="ovr", break_ties=True,
                           random_state=0), x, y)
    xt = xte.double().numpy()
    dec, pred = ref.decision_function(xt), ref.predict(xt)
    scores = head.scores(xte)
    if dec.ndim == 1:  # binary: sklearn gives one column, positive for class 1
        np.testing.assert_allclose(scores[:, 1].numpy(), dec, atol=1e-4)
        np.testing.assert_allclose(scores[:, 0].numpy(), -dec, atol=1e-4)
    else:
        np.testing.assert_allclose(scores.numpy(), dec, atol=1e-4)
    np.testing.assert_array_equal(scores.argmax(1).numpy(), pred)
    assert not head.probabilistic and head.num_params > 0 and head.macs_per_image > 0


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_svm_equals_sklearn_decision_function_and_predict(kernel, heads, digits):
    xtr, ytr, xte, _ = digits
    _check_svm(heads[f"svm-{kernel}"], kernel, xtr, ytr, xte)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_binary_svm_equals_sklearn(kernel, digits):
    x, y, xte = _binary(digits)
    head = fit_head("svm", x, y, num_classes=2, svm_kernel=kernel)
    _check_svm(head, kernel, x, y, xte)


def test_binary_logreg_equals_sklearn(digits):
    from sklearn.linear_model import LogisticRegression

    x, y, xte = _binary(digits)
    head = fit_head("logreg", x, y, num_classes=2)
    ref = _sk_pipeline(LogisticRegression(max_iter=1000, random_state=0), x, y)
    np.testing.assert_allclose(head.scores(xte).numpy(), ref.predict_proba(xte.double().numpy()),
                               atol=1e-4)


def test_xgboost_equals_predict_proba(heads, digits):
    import xgboost

    xtr, ytr, xte, _ = digits
    ref = xgboost.XGBClassifier(n_estimators=20, max_depth=4, learning_rate=0.3, subsample=1.0,
                                tree_method="hist", random_state=0, device="cpu")
    ref.fit(xtr.numpy(), ytr.numpy())
    head = heads["xgboost"]
    np.testing.assert_allclose(head.scores(xte).numpy(), ref.predict_proba(xte.numpy()),
                               atol=1e-5)
    # 20 rounds x 10 classes, each tree at most 4 levels deep.
    assert head.num_params > 200 and 200 <= head.macs_per_image <= 20 * 10 * 4


@pytest.mark.parametrize("name", CASES)
def test_state_round_trips_through_weights_only_torch_load(name, heads, digits, tmp_path):
    _, _, xte, _ = digits
    head = heads[name]
    torch.save(head.state(), tmp_path / "head.pt")
    state = torch.load(tmp_path / "head.pt", weights_only=True)
    assert state["kind"] == CASES[name][0] and state["num_classes"] == 10
    loaded = head_from_state(state)
    assert torch.equal(loaded.scores(xte), head.scores(xte))
    assert (loaded.num_params, loaded.macs_per_image) == (head.num_params, head.macs_per_image)


@pytest.mark.parametrize("name", CASES)
def test_class_missing_from_training_is_never_predicted(name, digits):
    xtr, ytr, xte, _ = digits
    kind, kw = CASES[name]
    keep = ytr != 3
    head = fit_head(kind, xtr[keep], ytr[keep], num_classes=10, **kw)
    scores = head.scores(xte)
    assert scores.shape == (len(xte), 10)
    assert not (scores.argmax(1) == 3).any()
    assert (scores[:, 3] == (0.0 if head.probabilistic else float("-inf"))).all()
    if head.probabilistic:
        torch.testing.assert_close(scores.sum(1), torch.ones(len(xte)))


def test_scores_accept_float64_and_return_float32(heads, digits):
    _, _, xte, _ = digits
    for head in heads.values():
        out = head.scores(xte.double())
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, head.scores(xte), rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scores_on_cuda_match_cpu(heads, digits):
    _, _, xte, _ = digits
    for head in heads.values():
        cpu = head.scores(xte)
        out = head.to("cuda").scores(xte.cuda())
        assert out.device.type == "cuda" and out.dtype == torch.float32
        torch.testing.assert_close(out.cpu(), cpu, rtol=0, atol=1e-5)
        head.to("cpu")


def test_linear_probe_equals_logreg_pipeline(digits):
    from sklearn.linear_model import LogisticRegression

    xtr, ytr, xte, _ = digits
    weight, bias = linear_probe(xtr, ytr, num_classes=10, c=0.5)
    assert weight.shape == (10, 64) and bias.shape == (10,) and weight.dtype == torch.float32
    ref = _sk_pipeline(LogisticRegression(C=0.5, max_iter=1000, random_state=0), xtr, ytr)
    np.testing.assert_allclose(torch.softmax(xte @ weight.T + bias, 1).numpy(),
                               ref.predict_proba(xte.double().numpy()), atol=1e-4)


def test_linear_probe_gives_absent_classes_a_zero_row_and_very_negative_bias(digits):
    xtr, ytr, xte, _ = digits
    weight, bias = linear_probe(xtr[ytr < 8], ytr[ytr < 8], num_classes=12)
    assert weight.shape == (12, 64) and torch.isfinite(bias).all()
    assert (weight[8:] == 0).all() and (bias[8:] <= -1e3).all()
    assert (torch.softmax(xte @ weight.T + bias, 1)[:, 8:] == 0).all()


def test_head_from_state_rejects_unknown_or_foreign_states(heads):
    with pytest.raises(ValueError, match="logreg.*svm.*xgboost"):
        head_from_state({"kind": "knn", "num_classes": 10})
    with pytest.raises(ValueError, match="kind"):
        head_from_state({"weight": torch.zeros(10, 64), "bias": torch.zeros(10)})
    state = heads["logreg"].state()
    del state["weight"]
    with pytest.raises(ValueError, match="weight"):
        head_from_state(state)
    with pytest.raises(ValueError, match="linear.*rbf"):
        head_from_state({**heads["svm-rbf"].state(), "kernel": "poly"})
    with pytest.raises(ValueError, match="inconsistent shapes"):
        head_from_state({**heads["svm-rbf"].state(), "classes": [0, 1, 2]})
    with pytest.raises(ValueError, match="XGBoost"):
        head_from_state({**heads["xgboost"].state(), "model": '{"learner": {}}'})


def test_fit_head_rejects_unknown_kind_kernel_and_bad_labels(digits):
    xtr, ytr, _, _ = digits
    with pytest.raises(ValueError, match=r"kind.*\('logreg', 'svm', 'xgboost'\)"):
        fit_head("knn", xtr, ytr, num_classes=10)
    with pytest.raises(ValueError, match=r"svm_kernel.*\('linear', 'rbf'\)"):
        fit_head("svm", xtr, ytr, num_classes=10, svm_kernel="poly")
    with pytest.raises(ValueError, match="labels"):
        fit_head("logreg", xtr, ytr, num_classes=5)
    with pytest.raises(ValueError, match="at least 2"):
        fit_head("logreg", xtr[ytr == 1], ytr[ytr == 1], num_classes=10)
    assert CLASSICAL_HEADS == ("logreg", "svm", "xgboost")


def test_xgboost_use_cuda_without_cuda_build_fits_on_cpu_and_warns_once(digits, caplog):
    import xgboost

    if xgboost.build_info().get("USE_CUDA"):
        pytest.skip("this xgboost build has CUDA; the fallback path does not run")
    xtr, ytr, xte, yte = digits
    with caplog.at_level(logging.WARNING, logger="trainables.heads"):
        head = fit_head("xgboost", xtr, ytr, num_classes=10, xgb_n_estimators=5,
                        xgb_max_depth=3, use_cuda=True)
    warnings = [r for r in caplog.records if r.name == "trainables.heads"]
    assert len(warnings) == 1 and "pip install xgboost" in warnings[0].getMessage()
    assert (head.scores(xte).argmax(1) == yte).float().mean() >= 0.6
