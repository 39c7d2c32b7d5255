"""The self-tuning command: STN's alternation (weight steps move only the weights, hyperparameter
steps only the hyperparameters and scales), the hyperparameter space and cutout, each search
(stn, none, tpe, random) from the command, and the refused configurations."""

import csv
import json
import math

import pytest
import torch
from torch import nn

from gatezoo.train import selftune
from gatezoo.train.core.config import ConfigError, load_config

SMALL = ["--model_args", "{width: 4, depths: [1, 1]}", "--valid_images", "16", "--batch_size", "16",
         "--eval_batch_size", "32", "--progress", "false", "--threads", "1"]


def _cfg(tiny_npz, tmp_path, *extra):
    return load_config(None, ["--data", str(tiny_npz), "--out", str(tmp_path), *SMALL, *extra],
                       keys=selftune.SELFTUNE_KEYS)


def test_space_maps_values_both_ways():
    cfg = {"tune": ["dropout", "cutout", "weight_decay"], "ranges": {"dropout": [0.0, 0.8], "cutout": [0, 14],
                                                                     "weight_decay": [1e-6, 1e-2]},
           "start": {"dropout": 0.3, "cutout": 5, "weight_decay": 1e-4}}
    space = selftune.Space(cfg, sites=2)
    assert space.names == ["dropout0", "dropout1", "cutout", "weight_decay"]
    values = space.values(space.unconstrained(space.start))
    torch.testing.assert_close(values, torch.tensor([0.3, 0.3, 5.0, 1e-4]), rtol=1e-5, atol=0)
    extremes = space.values(torch.tensor([[-50.0] * 4, [50.0] * 4]))
    assert extremes[0, :3].abs().max() < 1e-12 and math.isclose(extremes[0, 3], 1e-6, rel_tol=1e-5)
    assert extremes[1, 2] == 14 and math.isclose(extremes[1, 3], 1e-2, rel_tol=1e-5)


def test_cutout_zeroes_a_square_of_the_given_size():
    g = torch.Generator().manual_seed(0)
    x = torch.ones(50, 1, 28, 28)
    out = selftune.cutout(x, torch.full((50,), 6.0), g)
    zeros = (out == 0).sum(dim=(1, 2, 3))
    assert zeros.max() == 36 and (zeros <= 36).all() and (zeros > 0).all()  # clipped at the border at most
    assert torch.equal(selftune.cutout(x, torch.zeros(50), g), x)


def test_stn_alternation_moves_weights_then_hyperparameters(tiny_npz, tmp_path):
    cfg = _cfg(tiny_npz, tmp_path)
    data = selftune._Data(cfg, torch.device("cpu"))
    trainer = selftune._Trainer(cfg, data, torch.device("cpu"), stn=True)
    x, y = next(iter(data.train.epoch(0)))
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    h, sigma = trainer.h.detach().clone(), trainer.sigma.detach().clone()
    trainer.train_step(x, y, 0)
    assert torch.equal(trainer.h, h) and torch.equal(trainer.sigma, sigma)
    assert any(not torch.equal(weights[n], p) for n, p in trainer.model.named_parameters())
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.valid_step(x, y, 1)
    assert not torch.equal(trainer.h, h) and not torch.equal(trainer.sigma, sigma)
    assert all(torch.equal(weights[n], p) for n, p in trainer.model.named_parameters())


def test_validation_gradient_reaches_the_hyperparameters_only_through_the_gates(tiny_npz, tmp_path):
    cfg = _cfg(tiny_npz, tmp_path, "--entropy_weight", "0")
    data = selftune._Data(cfg, torch.device("cpu"))
    trainer = selftune._Trainer(cfg, data, torch.device("cpu"), stn=True)
    for m in trainer.model.modules():
        if hasattr(m, "gate_proj"):
            nn.init.zeros_(m.gate_proj.weight)
    x, y = next(iter(data.valid))
    h = trainer.h.detach().clone()
    trainer.valid_step(x, y, 0)
    assert torch.equal(trainer.h, h)  # zero gates: no path from h to the validation loss


@pytest.mark.parametrize("search", ["stn", "none", "tpe", "random"])
def test_selftune_command_runs_each_search(search, tiny_npz, tmp_path, capsys):
    argv = ["--data", str(tiny_npz), "--out", str(tmp_path), *SMALL, "--epochs", "2", "--search", search,
            "--trials", "2"]
    assert selftune.main(argv) == 0
    (run_dir,) = tmp_path.iterdir()
    result = json.loads((run_dir / "result.json").read_text())
    assert result["search"] == search and math.isfinite(result["test_loss"]) and result["seconds"] > 0
    assert set(result["hyperparameters"]) == {"dropout0", "dropout1", "cutout", "weight_decay"}
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert len(rows) == 2 and float(rows[-1]["test_loss"]) == pytest.approx(result["test_loss"], rel=1e-5)
    if search == "stn":
        schedule = list(csv.DictReader(open(run_dir / "schedule.csv")))
        assert schedule and (run_dir / "schedule.png").stat().st_size > 0
        assert float(schedule[-1]["cutout"]) == result["hyperparameters"]["cutout"]
    if search in ("tpe", "random"):
        trials = list(csv.DictReader(open(run_dir / "trials.csv")))
        assert len(trials) == 2
        best = min(trials, key=lambda t: float(t["valid_loss"]))
        assert float(best["test_loss"]) == pytest.approx(result["test_loss"], rel=1e-5)
    if search == "none":
        assert result["hyperparameters"]["cutout"] == 4.0
        assert result["hyperparameters"]["dropout0"] == pytest.approx(0.05, rel=1e-4)
    assert "test cross-entropy" in capsys.readouterr().out


def test_stn_on_vit_gates_every_linear_that_runs(tiny_npz, tmp_path):
    cfg = _cfg(tiny_npz, tmp_path, "--model", "vit_tiny", "--model_args", "{dim: 16, depth: 1, heads: 2, "
               "patch_size: 4}")
    trainer = selftune._Trainer(cfg, selftune._Data(cfg, torch.device("cpu")), torch.device("cpu"), stn=True)
    gated = [n for n, m in trainer.model.named_modules() if type(m).__name__ in ("HyperLinear", "HyperConv2d")]
    assert "head" in gated and any("attn" in n for n in gated)


@pytest.mark.parametrize("argv, match", [
    (["--ranges", "{dropout: [0.0, 0.5], cutout: [0, 10]}"], "'weight_decay' has no range"),
    (["--tune", "[dropout, momentum]"], "unknown hyperparameter(s) ['momentum']"),
    (["--tune", "[]"], "give at least one hyperparameter"),
    (["--ranges", "{dropout: [0.5, 0.2], cutout: [0, 14], weight_decay: [1.0e-6, 1.0e-2]}"],
     "ranges.dropout = [0.5, 0.2] is not a valid range"),
    (["--start", "{dropout: 0.1, cutout: 30, weight_decay: 1.0e-4}"], "start.cutout = 30 must be a number within"),
    (["--gate_layers", "nothing"], "has no layer to hyper-gate"),
    (["--valid_images", "100000"], "valid_images must be in"),
    (["--search", "grid"], "search"),
])
def test_selftune_refuses_bad_configs(argv, match, tiny_npz, tmp_path, capsys):
    assert selftune.main(["--data", str(tiny_npz), "--out", str(tmp_path), *SMALL, *argv]) == 2
    assert match in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_dropout_needs_a_blocks_stack():
    with pytest.raises(ConfigError, match="has no 'blocks' stack"):
        selftune.add_dropout_sites(nn.Linear(2, 2))


def test_shipped_config_loads():
    import pathlib

    cfg = load_config(pathlib.Path(__file__).resolve().parents[1] / "configs" / "selftune.yaml",
                      keys=selftune.SELFTUNE_KEYS)
    assert cfg["search"] == "stn" and cfg["train_steps"] == 2 and cfg["entropy_weight"] == 1e-3


def test_train_images_takes_a_seeded_subset_disjoint_from_validation(tiny_npz, tmp_path):
    full = selftune._Data(_cfg(tiny_npz, tmp_path), torch.device("cpu"))
    sub = selftune._Data(_cfg(tiny_npz, tmp_path, "--train_images", "20"), torch.device("cpu"))
    again = selftune._Data(_cfg(tiny_npz, tmp_path, "--train_images", "20"), torch.device("cpu"))
    assert len(sub.train.labels) == 20 < len(full.train.labels)
    assert torch.equal(sub.train.images, again.train.images)
    assert torch.equal(sub.valid.images, full.valid.images)
    rows = {tuple(r.flatten().tolist()) for r in full.train.images}
    assert all(tuple(r.flatten().tolist()) in rows for r in sub.train.images)


def test_tpe_startup_reaches_optunas_sampler(tiny_npz, tmp_path, monkeypatch):
    optuna = pytest.importorskip("optuna")
    seen = {}
    real = optuna.samplers.TPESampler

    def spy(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(optuna.samplers, "TPESampler", spy)
    argv = ["--data", str(tiny_npz), "--out", str(tmp_path), *SMALL, "--epochs", "1", "--search", "tpe",
            "--trials", "1", "--tpe_startup", "3"]
    assert selftune.main(argv) == 0
    assert seen == {"seed": 0, "n_startup_trials": 3}
