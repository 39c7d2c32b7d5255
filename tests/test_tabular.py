"""Tabular models (gatezoo.models.tabular) and the tabular command (gatezoo.train.tabular)."""

import csv
import subprocess
import sys

import numpy as np
import pytest
import torch

from gatezoo.models import create_model, list_models
from gatezoo.models.tabular import PiecewiseLinearEmbedding, TabularConfig, quantile_edges
from gatezoo.train import tabular
from gatezoo.train.core.factory import count_params
from gatezoo.train.data.images import write_idx

TABULAR = ["tabular_ggmoe", "tabular_ggmoe_ple", "tabular_grkan_moe", "tabular_grkan_moe_ple", "tabular_mlp",
           "tabular_mlp_ple", "tabular_moe", "tabular_moe_ple"]
TINY = {"num_features": 3, "num_outputs": 2, "width": 4, "depth": 3, "num_experts": 2, "bins": 3, "emb_dim": 2}


def test_registry_has_the_tabular_presets():
    assert sorted(n for n in list_models() if n.startswith("tabular")) == TABULAR


@pytest.mark.parametrize("name", TABULAR)
def test_forward_shape_and_every_parameter_learns(name):
    torch.manual_seed(0)
    model = create_model(name, **TINY)
    model.fit_embedding(torch.randn(50, 3))
    out = model(torch.randn(7, 3))
    assert out.shape == (7, 2) and torch.isfinite(out).all()
    out.square().sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


def test_parameter_counts_by_hand():
    # width 4, depth 3, E 2 -> expert hidden 4 * 2 // (2 * 2) = 2; 3 features, 2 outputs; PLE 3 bins, 2 wide
    stem, head = 3 * 4 + 4, 4 * 2 + 2
    hidden = 2 * (4 * 4 + 4)
    experts = 2 * (4 * 2 + 2) + 2 * (2 * 4 + 4)  # w1, b1, w2, b2 of two experts
    emb = 3 * 3 * 2 + 3 * 2  # one (3 bins -> 2) linear map per feature
    stem_ple = 3 * 2 * 4 + 4
    assert 2 * (4 * 2) + 2 * (2 * 4) == 2 * (4 * 4)  # matched budget: the experts' weights = the hidden layers'
    count = lambda name: count_params(create_model(name, **TINY))  # noqa: E731
    assert count("tabular_mlp") == stem + hidden + head == 66
    assert count("tabular_mlp_ple") == emb + stem_ple + hidden + head
    assert count("tabular_moe") == stem + experts + 4 * 2 + head  # softmax gate W_g, no bias
    assert count("tabular_ggmoe") == stem + experts + 4 * 2 + 2 + head  # Gumbel gate with an intercept
    assert count("tabular_ggmoe_ple") == emb + stem_ple + experts + 4 * 2 + 2 + head
    grkan = create_model("tabular_grkan_moe", **TINY)
    assert count("tabular_grkan_moe") == stem + experts + count_params(grkan.moe.router) + head


def _ple_by_hand(x: np.ndarray, edges: list[np.ndarray], weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    out = []
    for row in x:
        parts = []
        for j, v in enumerate(row):
            e = edges[j]
            t_count = len(e) - 1
            enc = np.zeros(weight.shape[1])
            for t in range(t_count):
                z = (v - e[t]) / (e[t + 1] - e[t])
                if t > 0:
                    z = max(z, 0.0)
                if t < t_count - 1:
                    z = min(z, 1.0)
                enc[t] = z
            parts.append(enc @ weight[j] + bias[j])
        out.append(np.concatenate(parts))
    return np.array(out)


def test_piecewise_linear_embedding_matches_a_by_hand_computation_in_float64():
    rng = np.random.default_rng(3)
    train = np.stack([rng.normal(size=200), rng.integers(0, 3, 200).astype(float), np.full(200, 2.5)], 1)
    emb = PiecewiseLinearEmbedding(3, bins=5, dim=4).double()
    torch.nn.init.normal_(emb.weight)
    torch.nn.init.normal_(emb.bias)
    emb.fit(train)
    edges = quantile_edges(train, 5)
    assert [len(e) - 1 for e in edges] == [5, 2, 1]  # distinct quantiles; a constant column has one bin
    assert emb.count.tolist() == [5, 2, 1]
    x = np.concatenate([rng.normal(scale=2.0, size=(9, 3)), [[-50.0, -7.0, 9.0], [50.0, 7.0, -9.0]]])
    got = emb(torch.tensor(x)).detach().numpy()
    want = _ple_by_hand(x, edges, emb.weight.detach().numpy(), emb.bias.detach().numpy())
    assert got.shape == (11, 12)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    enc = emb.encode(torch.tensor(x))
    assert (enc[:, 1, 2:] == 0).all() and (enc[:, 2, 1:] == 0).all()  # unused bins encode to 0


def test_gg_moe_eval_is_deterministic_and_training_is_stochastic():
    torch.manual_seed(0)
    model = create_model("tabular_ggmoe", **TINY, dropout=0.0)
    x = torch.randn(16, 3)
    model.eval()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    b = model(x)
    assert torch.equal(a, b)
    torch.testing.assert_close(model(x[5:9]), a[5:9], rtol=1e-6, atol=1e-7)  # nor does the batch around a row
    model.train()
    assert not torch.allclose(model(x), model(x))  # a fresh Gumbel sample per forward


def test_config_errors_name_the_argument():
    with pytest.raises(ValueError, match="gate must be None"):
        TabularConfig(gate="topk").validate()
    with pytest.raises(ValueError, match="embedding must be one of"):
        create_model("tabular_mlp", embedding="periodic")
    with pytest.raises(TypeError, match="width"):
        create_model("tabular_moe", width=4.0)
    with pytest.raises(ValueError, match="dropout"):
        create_model("tabular_mlp", dropout=1.5)
    model = create_model("tabular_mlp", num_features=3)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3\)"):
        model(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"x must have shape \(N, 3\)"):
        PiecewiseLinearEmbedding(3).fit(np.zeros((5, 2)))


@pytest.mark.parametrize("name,features,task", [("wine", 13, "classification"), ("diabetes", 10, "regression"),
                                                 ("synth_class", 20, "classification"),
                                                 ("synth_reg", 10, "regression")])
def test_tables_have_the_right_shapes_and_are_standardised_on_train_only(name, features, task):
    t = tabular.load_table(name, seed=0)
    x, _, _ = tabular.raw_table(name)
    n = len(x)
    assert t.task == task and t.x_train.shape[1] == features
    assert len(t.y_test) == int(np.ceil(0.2 * n)) and len(t.y_train) + len(t.y_val) + len(t.y_test) == n
    assert len(t.y_val) == int(np.ceil(0.2 * (n - len(t.y_test))))
    torch.testing.assert_close(t.x_train.mean(0), torch.zeros(features), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.x_train.std(0, unbiased=False), torch.ones(features), atol=1e-4, rtol=0)
    assert t.x_val.mean(0).abs().max() > 1e-3  # not re-standardised on its own rows
    if task == "regression":
        assert abs(float(t.y_train.mean())) < 1e-5 and t.y_sd > 1
    else:
        assert t.classes == int(t.y_train.max()) + 1
    other = tabular.load_table(name, seed=1)
    assert not torch.equal(other.x_train[:5], t.x_train[:5])  # the split follows the seed


def test_fashion_table_reads_idx_files_and_draws_rows_per_seed(tmp_path):
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (80, 28, 28), dtype=np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(80, dtype=np.uint8) % 10)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (10, 28, 28), dtype=np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(10, dtype=np.uint8))
    t = tabular.load_table("fashion", seed=0, fashion_rows=60, data=str(tmp_path))
    assert t.x_train.shape[1] == 784 and t.classes == 10
    assert len(t.y_train) + len(t.y_val) + len(t.y_test) == 60
    torch.testing.assert_close(t.x_train.mean(0), torch.zeros(784), atol=1e-5, rtol=0)
    with pytest.raises(tabular.ConfigError, match="fashion_rows"):
        tabular.load_table("fashion", seed=0, fashion_rows=81, data=str(tmp_path))


def test_early_stopping_keeps_the_best_validation_epoch():
    stop = tabular.EarlyStopping(patience=3, mode="max")
    model = torch.nn.Linear(1, 1)
    scores = [(0.5, 1.0), (0.7, 0.9), (0.7, 0.8), (0.6, 0.7), (0.65, 0.6), (0.7, 0.85), (0.9, 0.1)]
    stopped = None
    for epoch, (score, loss) in enumerate(scores):
        with torch.no_grad():
            model.weight.fill_(epoch)
        if stop.step(epoch, score, loss, model):
            stopped = epoch
            break
    assert stopped == 5 and stop.best_epoch == 2  # a tie on the score goes to the lower loss
    assert float(stop.best_state["weight"]) == 2.0  # a copy of that epoch's weights
    low = tabular.EarlyStopping(patience=2, mode="min")
    assert [low.step(e, s, 0.0) for e, s in enumerate([3.0, 2.0, 2.5, 2.1])] == [False, False, False, True]
    assert low.best_epoch == 1


def test_count_wins_by_hand():
    s = lambda d, m, mean, sd, metric="accuracy": {"dataset": d, "model": m, "metric_name": metric,  # noqa: E731
                                                    "mean": mean, "sd": sd}
    summary = [s("a", "mlp", 0.90, 0.01), s("a", "ggmoe_ple", 0.95, 0.01), s("a", "hgb", 0.99, 0.0),
               s("b", "mlp", 10.0, 0.5, "rmse"), s("b", "ggmoe_ple", 10.2, 0.5, "rmse"),
               s("b", "hgb", 11.0, 0.1, "rmse")]
    counts = {c["comparison"]: c for c in tabular.count_wins(summary)}
    c = counts["ggmoe_ple >= mlp"]
    assert (c["datasets"], c["at_least"], c["clear_wins"], c["clear_losses"], c["where"]) == (2, 1, 1, 0, "a")
    assert counts["hgb > every network"]["where"] == "a"


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_run_on_wine_writes_the_csvs_and_the_plot(tmp_path):
    bench = tmp_path / "bench"
    code = tabular.main(["--datasets", "[wine]", "--models", "[mlp, ggmoe_ple]", "--seeds", "1", "--epochs", "3",
                         "--out", str(tmp_path / "runs"), "--progress", "false", "--copy_to", str(bench)])
    assert code == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    rows = _rows(run_dir / "runs.csv")
    assert [(r["dataset"], r["model"], r["embedding"], r["seed"]) for r in rows] == [
        ("wine", "mlp", "none", "0"), ("wine", "ggmoe_ple", "ple", "0")]
    for r in rows:
        assert 0 <= float(r["metric"]) <= 1 and int(r["params"]) > 0 and 1 <= int(r["epochs"]) <= 3
        assert float(r["seconds"]) > 0
    summary = _rows(run_dir / "summary.csv")
    assert [r["model"] for r in summary] == ["mlp", "ggmoe_ple"] and summary[0]["seeds"] == "1"
    assert (run_dir / "result.json").is_file() and (run_dir / "tabular.png").stat().st_size > 0
    assert _rows(bench / "tabular.csv") == rows and (bench / "tabular-summary.csv").is_file()
    assert (bench / "tabular.png").is_file()


@pytest.mark.parametrize("args,message", [
    (["--datasets", "[iris]"], "unknown datasets ['iris']"),
    (["--models", "[mlp, mlp]"], "models lists a name twice"),
    (["--models", "[]"], "models must name at least one"),
    (["--seeds", "0"], "'seeds' must be >= 1"),
    (["--epoch", "3"], "unknown config key 'epoch'"),
], ids=["dataset", "twice", "empty", "seeds", "unknown-key"])
def test_bad_options_are_refused(args, message, capsys, tmp_path):
    assert tabular.main([*args, "--out", str(tmp_path), "--progress", "false"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not list(tmp_path.iterdir())  # nothing written


def test_bad_option_exit_status_from_the_shell(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gatezoo.train.tabular", "--lr", "-1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "error: config key 'lr' must be >= 0.0" in proc.stderr
