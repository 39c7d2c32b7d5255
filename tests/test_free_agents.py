"""RLFA free agents (gatezoo.train.free_agents): the streams, the reward, the release / probation /
replacement rules, the recovery measure, refusals, and the command end to end."""

import json
import math

import numpy as np
import pytest
import torch

from gatezoo.train import free_agents as fa
from gatezoo.train.core.config import ConfigError, load_config, parse_overrides

SMALL = ["--windows", "12", "--window_size", "80", "--hidden", "8", "--experts", "2", "--epochs", "1",
         "--memory", "2", "--patience", "1", "--probation", "2", "--recent", "2", "--progress", "false"]


def _cfg(tmp_path, *extra):
    return load_config(None, parse_overrides(["--out", str(tmp_path), *SMALL, *extra], fa.FREE_AGENT_KEYS),
                       keys=fa.FREE_AGENT_KEYS)


def test_fraud_stream_is_seeded_rare_and_drifts_where_it_says():
    a, b = fa.fraud_stream(30, 500, seed=3), fa.fraud_stream(30, 500, seed=3)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert a.x.shape == (30, 500, 10) and a.drifts == [10, 20] and a.metric == "recall"
    rate = float(a.y.float().mean())
    assert 0.01 < rate < 0.08
    calm = fa.fraud_stream(30, 500, seed=3, drift=False)
    assert calm.drifts == [] and calm.name == "fraud-nodrift"

    # the fraud pattern before the abrupt drift: the direction the frauds' mean points to
    def pattern(x, y):
        m = x[y == 1].mean(0)
        return m / m.norm()

    before = pattern(a.x[:10].flatten(0, 1), a.y[:10].flatten())
    after = pattern(a.x[10:20].flatten(0, 1), a.y[10:20].flatten())
    still = pattern(calm.x[10:20].flatten(0, 1), calm.y[10:20].flatten())
    assert abs(float(before @ after)) < 0.5 < float(before @ still)  # orthogonal patterns vs the same one


def test_fashion_stream_swaps_then_adds_classes(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 20)
    x = rng.integers(0, 255, (200, 4, 4)).astype(np.uint8)
    x[:, 0, 0] = y * 25  # the class is readable from pixel (0, 0)
    path = tmp_path / "ten.npz"
    np.savez(path, x=x, y=y, x_test=x[:20], y_test=y[:20])
    s = fa.fashion_stream(9, 50, seed=0, data=str(path))
    assert s.drifts == [3, 6] and s.classes == 10
    assert int(s.y[:6].max()) <= 5 and int(s.y[6:].max()) >= 6
    # the raw class from pixel (0, 0): after the first drift, labels 0 <-> 1 and 2 <-> 3 are swapped
    raw = s.x[..., 0]  # normalised pixel (0, 0): its order is the raw class's
    for t in (0, 4):
        order = torch.argsort(raw[t])
        labels = s.y[t][order].tolist()
        first = [lab for lab in labels if lab in (0, 1)]
        assert first == sorted(first, reverse=t >= 3), (t, first)


def test_rewards_follow_the_papers_form_on_a_hand_made_window():
    y = torch.tensor([0, 1, 1, 0])
    probs = torch.tensor([[[0.9, 0.1], [0.5, 0.5]], [[0.95, 0.05], [0.2, 0.8]], [[0.3, 0.7], [0.4, 0.6]],
                          [[0.6, 0.4], [0.45, 0.55]]])
    gate = torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.9, 0.1]])
    mix = (gate.unsqueeze(-1) * probs).sum(1)
    cfg = {"alpha": 1.0, "beta": 0.2, "gamma": 0.1, "delta": 0.5}
    r0, r1 = fa.rewards(probs, gate, mix, y, "accuracy", cfg)
    # agent 0 predicts 0,0,1,0 (examples 0, 2, 3 right) with gate weights 0.8, 0.3, 0.6, 0.9; the
    # mixture gets all four right; agent 0 is the gate's top pick on examples 0, 2, 3; it gives the
    # wrong class 0.95 on example 1 (weight 0.3)
    assert r0["score"] == pytest.approx(2.3 / 2.6) and r0["synergy"] == pytest.approx(2.3 / 2.6)
    assert r0["efficiency"] == 0.75 and r0["penalty"] == pytest.approx(0.3 / 2.6)
    assert r0["reward"] == pytest.approx(2.3 / 2.6 * 1.2 + 0.1 * 0.75 - 0.5 * 0.3 / 2.6)
    # agent 1 predicts 0,1,1,1 (a tie goes to class 0): weights 0.2, 0.7, 0.4, 0.1
    assert r1["score"] == pytest.approx(1.3 / 1.4) and r1["efficiency"] == 0.25 and r1["penalty"] == 0.0
    # recall: the frauds are examples 1 and 2 (weights 0.3, 0.6); agent 0 catches the second
    assert fa.rewards(probs, gate, mix, y, "recall", cfg)[0]["score"] == pytest.approx(0.6 / 0.9)


def test_slot_reward_of_the_incumbent_is_its_reward(tmp_path):
    cfg = _cfg(tmp_path)
    stream = fa.fraud_stream(12, 80, seed=0)
    agents = [fa._new_agent(stream, cfg, s) for s in range(3)]
    roster = fa.Roster(agents, 10)
    roster.eval()
    x, y = stream.x[0], stream.y[0]
    with torch.no_grad():
        mix, probs, gate = roster(x)
    want = fa.rewards(probs, gate, mix, y, "recall", cfg)[1]["reward"]
    assert fa.slot_reward(agents[1], 1, x, y, probs, gate, "recall", cfg) == pytest.approx(want, abs=1e-6)


def test_recovery_counts_windows_until_the_score_holds_again():
    rows = [{"score": s} for s in [0.8] * 5 + [0.8, 0.3, 0.5, 0.75, 0.8, 0.8, 0.2, 0.9, 0.9, 0.9]]
    (rec,) = fa.recovery(rows, [5], 0.9)
    assert rec["pre_level"] == pytest.approx(0.8) and rec["min_after"] == pytest.approx(0.2)
    assert rec["windows_to_recover"] == 3  # the dip at window 6; from 8, three windows in a row >= 0.72
    rows = [{"score": s} for s in [0.8] * 5 + [0.8, 0.3, 0.75, 0.2, 0.8, 0.8, 0.9]]
    assert fa.recovery(rows, [5], 0.9)[0]["windows_to_recover"] == 4  # 0.75 alone is not back
    assert fa.recovery([{"score": 0.8}] * 10, [5], 0.9)[0]["windows_to_recover"] == 0
    assert math.isnan(fa.recovery([{"score": 0.8}] * 5 + [{"score": 0.1}] * 5, [5], 0.9)[0]["windows_to_recover"])


def test_release_probation_and_replacement_follow_the_rules(tmp_path, monkeypatch):
    """Scripted rewards: slot 0 earns 1.0 until window 5, then 0.1; a free agent in its place
    would earn 0.5. With memory 2 and patience 1 it is released at window 5, shadowed for 2
    windows (5 is the release window; 6 and 7 are the probation) and replaced at 7."""
    cfg = _cfg(tmp_path)
    stream = fa.fraud_stream(12, 80, seed=0)
    state = {"t": 0}
    real = fa.rewards

    def scripted(probs, gate, mix, y, metric, cfg):
        out = real(probs, gate, mix, y, metric, cfg)
        for k, part in enumerate(out):
            part["reward"] = 1.0 if k or state["t"] < 5 else 0.1
        return out

    def scripted_slot(agent, k, *args):
        return 0.5

    monkeypatch.setattr(fa, "rewards", scripted)
    monkeypatch.setattr(fa, "slot_reward", scripted_slot)
    original = fa.fit

    def fit(model, *args, **kwargs):
        if isinstance(model, fa.Roster):
            state["t"] += 1  # the roster learns once per window, after its rewards
        return original(model, *args, **kwargs)

    monkeypatch.setattr(fa, "fit", fit)
    rows, events = fa.run_stream(cfg, stream)
    kinds = [(e["window"], e["slot"], e["event"]) for e in events]
    assert kinds[:2] == [(5, 0, "release"), (7, 0, "replace")]
    assert all(e["slot"] == 0 for e in events)  # the others never fall
    assert rows[5]["events"] == "release:0" and rows[7]["events"] == "replace:0"


def test_a_bad_config_is_refused(tmp_path, capsys):
    with pytest.raises(ConfigError, match="probation"):
        fa.check_config(_cfg(tmp_path, "--probation", "4"))
    assert fa.main(["--out", str(tmp_path), *SMALL, "--probation", "30"]) == 2
    assert "probation (30)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="agents"):
        _cfg(tmp_path, "--agents", "0")


@pytest.mark.parametrize("method", ["rlfa", "static", "adwin"])
def test_command_writes_the_run(tmp_path, method, capsys):
    if method == "adwin":
        pytest.importorskip("river")
    assert fa.main(["--out", str(tmp_path), *SMALL, "--method", method]) == 0
    (run_dir,) = tmp_path.glob(f"fraud-{method}-*")
    result = json.loads((run_dir / "result.json").read_text())
    assert result["method"] == method and len(result["windows_to_recover"]) == 2
    assert (run_dir / "history.png").is_file() and (run_dir / "windows.csv").read_text().count("\n") == 13
    assert "windows to recover" in capsys.readouterr().out
