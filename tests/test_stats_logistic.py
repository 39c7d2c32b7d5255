"""gatezoo.stats.logistic: the multinomial logistic mixture of experts; one expert equals
scikit-learn's unpenalised multinomial logistic regression, EM never lowers the likelihood, the
class probabilities sum to one, and bad input is refused."""

import pytest
import torch

from gatezoo.stats.logistic import LogisticMoE, fit_em_logistic

F64 = torch.float64


def _truth(gate="softmax"):
    # expert 0 has a vanishing slope (eta = 0): the case the paper singles out
    return LogisticMoE(beta1=[[2.0], [0.0]], beta0=[0.5, 0.0], eta=[[[0.0], [0.0]], [[-3.0], [0.0]]],
                       tau=[[1.0, 0.0], [-0.5, 0.0]], gate=gate)


def test_class_probabilities_sum_to_one():
    m = LogisticMoE(beta1=[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], beta0=[0.0, 0.3, 0.0],
                    eta=torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(0), dtype=F64),
                    tau=torch.zeros(3, 4))
    x, _ = m.sample(9, seed=1)
    total = sum(m.log_density(x, torch.full((9,), c)).exp() for c in range(4))
    torch.testing.assert_close(total, torch.ones(9, dtype=F64))


def test_one_expert_is_sklearns_multinomial_logistic_regression():
    sklearn = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, generator=g, dtype=F64)
    logits = x @ torch.tensor([[1.0, -1.0], [0.5, 2.0], [0.0, 0.0]], dtype=F64).T + torch.tensor([0.2, -0.3, 0.0])
    y = torch.multinomial(torch.softmax(logits, 1), 1, generator=g).squeeze(1)
    fit = fit_em_logistic(x, y, 1, 3, restarts=1, tol=1e-12)
    ref = sklearn.LogisticRegression(C=float("inf"), tol=1e-12, max_iter=10000).fit(x.numpy(), y.numpy())
    ours = (torch.einsum("nd,cd->nc", x, fit.model.eta[0]) + fit.model.tau[0]).softmax(1)
    theirs = torch.from_numpy(ref.predict_proba(x.numpy()))
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("gate", ["softmax", "modified"])
def test_em_never_lowers_the_likelihood(gate):
    truth = _truth(gate)
    x, y = truth.sample(3000, seed=2)
    fit = fit_em_logistic(x, y, 2, 2, gate=gate, restarts=2, seed=0, max_iter=200)
    assert all(b >= a - 1e-10 for a, b in zip(fit.trace, fit.trace[1:]))
    assert fit.log_likelihood >= truth.log_likelihood(x, y) - 1e-9


@pytest.mark.parametrize("call, match", [
    (lambda: fit_em_logistic(torch.randn(50, 1), torch.randint(0, 2, (50,)), 2, 1), "classes must be an int >= 2"),
    (lambda: fit_em_logistic(torch.randn(50, 1), torch.rand(50), 2, 2), "integer class labels"),
    (lambda: fit_em_logistic(torch.randn(50, 1), torch.full((50,), 3), 2, 2), r"y must lie in \[0, 2\)"),
    (lambda: fit_em_logistic(torch.randn(5, 1), torch.randint(0, 2, (5,)), 2, 2), "cannot identify"),
    (lambda: LogisticMoE([[1.0]], [0.0], [[[1.0]]], [[0.0]]), "C >= 2 classes"),
])
def test_bad_input_is_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()
