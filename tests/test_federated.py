"""FedJETs and the federated baselines (gatezoo.train.federated, gatezoo.models.fedmoe): partitions,
the mixture, the client steps through Flower's records, the strategy's aggregation, refusals, and
one run through Flower's simulation runtime."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gatezoo.models.fedmoe import FedMoE, MLPClassifier, dense_hidden_for
from gatezoo.train import federated as fl
from gatezoo.train.core.config import ConfigError, load_config

flwr = pytest.importorskip("flwr")
from flwr.app import ArrayRecord, ConfigRecord, RecordDict  # noqa: E402


@pytest.fixture(scope="module")
def ten_class_npz(tmp_path_factory):
    """8x8 grayscale images of 10 classes (a bright pixel pair at a class's own place): 600 train
    (60 per class), 100 test."""
    rng = np.random.default_rng(1)

    def make(per):
        y = np.repeat(np.arange(10), per)
        x = rng.integers(0, 40, (len(y), 8, 8)).astype(np.uint8)
        for i, c in enumerate(y):
            x[i, c // 3 * 2, c % 3 * 2: c % 3 * 2 + 2] += 200
        return x, y

    (x, y), (xt, yt) = make(60), make(10)
    path = tmp_path_factory.mktemp("fed") / "ten.npz"
    np.savez(path, x=x, y=y, x_test=xt, y_test=yt)
    return path


SMALL = ["--clients", "10", "--unseen_clients", "5", "--unseen_images", "10", "--experts", "5", "--hidden", "8",
         "--common_rounds", "1", "--rounds", "2", "--clients_per_round", "6", "--batch_size", "16",
         "--finetune_epochs", "1", "--progress", "false"]


def _load(npz, tmp_path, *extra):
    from gatezoo.train.core.config import parse_overrides

    return load_config(None, parse_overrides(["--data", str(npz), "--out", str(tmp_path), *SMALL, *extra],
                                             fl.FEDERATED_KEYS), keys=fl.FEDERATED_KEYS)


# ---------------------------------------------------------------------------------- partitions


def test_class_groups_use_every_class_equally_with_distinct_classes_per_client():
    rng = np.random.default_rng(0)
    fixed = [[0, 1], [2, 3]]
    groups = fl.class_groups(10, 50, 2, rng, fixed)
    assert groups[:2] == fixed and len(groups) == 50
    assert all(len(set(g)) == 2 for g in groups)
    assert np.bincount(np.concatenate(groups), minlength=10).tolist() == [10] * 10
    with pytest.raises(ValueError, match="multiple of classes"):
        fl.class_groups(10, 7, 3, rng)


def test_split_by_groups_and_dirichlet_cover_the_pool_disjointly():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 30)
    pool = np.arange(0, 300, 2)
    groups = fl.class_groups(10, 10, 2, rng)
    parts = fl.split_by_groups(labels, pool, groups, rng)
    assert sorted(np.concatenate(parts).tolist()) == pool.tolist()
    for g, p in zip(groups, parts):
        assert set(labels[p].tolist()) == set(g)
    parts = fl.dirichlet_split(labels, pool, 7, 0.3, rng)
    assert sorted(np.concatenate(parts).tolist()) == pool.tolist()
    assert min(len(p) for p in parts) >= 2


def test_federation_keeps_unseen_clients_out_of_training_and_gives_anchors_their_group(ten_class_npz, tmp_path):
    cfg = _load(ten_class_npz, tmp_path)
    fed = fl.federation(cfg)
    seen = np.concatenate(fed.clients)
    held = np.concatenate([np.concatenate(u) for u in fed.unseen])
    assert len(set(seen.tolist())) == len(seen) and not set(seen.tolist()) & set(held.tolist())
    assert len(seen) + len(held) == 600
    labels = fed.train_labels.numpy()
    assert fed.anchors == {e: e for e in range(5)}
    for e in range(5):
        assert set(labels[fed.clients[e]].tolist()) == {2 * e, 2 * e + 1}
    for support, query in fed.unseen:
        assert not set(support.tolist()) & set(query.tolist())
        assert len(set(labels[support].tolist()) | set(labels[query].tolist())) == 2
    fed2 = fl.federation(_load(ten_class_npz, tmp_path, "--partition", "dirichlet", "--alpha", "0.5"))
    assert sorted(fed2.anchors.values()) == list(range(5)) and len(fed2.anchors) == 5


# ---------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("extra, match", [
    (["--experts", "6"], "experts .6. x classes_per_client .2. must be <= the 10 classes"),
    (["--top_k", "6", "--anchors", "false", "--experts", "5"], r"top_k \(6\) must be <= experts"),
    (["--clients_per_round", "11"], r"clients_per_round \(11\) must be <= clients"),
    (["--classes_per_client", "3"], "multiple of the 10 classes"),
    (["--clients_per_round", "4"], r"experts \(5\) must be <= clients_per_round \(4\) when every anchor"),
])
def test_bad_federations_are_refused(ten_class_npz, tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        fl.federation(_load(ten_class_npz, tmp_path, *extra))


def test_zero_clients_per_round_is_refused_by_the_config(ten_class_npz, tmp_path):
    with pytest.raises(ConfigError, match="clients_per_round"):
        _load(ten_class_npz, tmp_path, "--clients_per_round", "0")


def test_command_refuses_a_bad_config_with_exit_status_2(ten_class_npz, tmp_path, capsys):
    assert fl.main(["--data", str(ten_class_npz), "--out", str(tmp_path), *SMALL, "--experts", "6"]) == 2
    assert "classes_per_client" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- the model


def test_fedmoe_is_the_gated_mixture_of_the_selected_experts_in_float64():
    torch.manual_seed(0)
    common = MLPClassifier(7, 5, 4).double()
    moe = FedMoE(common, [MLPClassifier(7, 3, 4).double() for _ in range(4)]).double()
    x = torch.randn(9, 7, dtype=torch.float64)
    sel = [3, 1]
    s = moe.gate(common.embed(x))[:, sel].softmax(-1)
    ref = sum(s[:, i:i + 1] * moe.experts[e](x).softmax(-1) for i, e in enumerate(sel)).log()
    torch.testing.assert_close(moe(x, sel), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(moe(x).exp().sum(-1), torch.ones(9, dtype=torch.float64))
    F.nll_loss(moe(x, sel), torch.zeros(9, dtype=torch.long)).backward()
    assert common.hidden.weight.grad is None  # the gate reads a detached embedding
    assert moe.experts[0].hidden.weight.grad is None and moe.experts[3].hidden.weight.grad is not None
    for bad in ([], [1, 1], [4], [-1]):
        with pytest.raises(ValueError, match="selected"):
            moe(x, bad)


def test_dense_width_matches_a_client_s_compute():
    moe = FedMoE(MLPClassifier(784, 64, 10), [MLPClassifier(784, 64, 10) for _ in range(5)])
    h = dense_hidden_for(784, 10, moe.macs(2))
    assert MLPClassifier(784, h, 10).macs() >= moe.macs(2) > MLPClassifier(784, h - 1, 10).macs()


def test_choose_experts_puts_an_anchor_s_own_expert_first():
    gate = torch.tensor([0.1, 0.5, 0.05, 0.3, 0.05])
    assert fl.choose_experts(gate, 2) == [1, 3]
    assert fl.choose_experts(gate, 2, anchor=2) == [1, 2]


def test_fedprox_step_adds_mu_times_the_distance_to_the_global_weights(ten_class_npz, tmp_path):
    cfg = dict(_load(ten_class_npz, tmp_path, "--batch_size", "1000", "--lr", "0.1"))
    fed = fl.federation(cfg)
    plain, prox = fl.build_dense(cfg), fl.build_dense(cfg)
    glob = {k: v.detach().clone() - 1.0 for k, v in prox.named_parameters()}
    fl.local_sgd(plain, fl._ce, fed, fed.clients[0], cfg, 1, 0)  # one full batch: one SGD step
    fl.local_sgd(prox, fl._ce, fed, fed.clients[0], cfg, 1, 0, prox=glob, mu=0.5)
    for a, b in zip(plain.parameters(), prox.parameters()):
        # the proximal gradient mu (w - w_glob) = 0.5 at the start: the step differs by lr * 0.5
        torch.testing.assert_close(b.detach() - a.detach(), torch.full_like(a, -0.05), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------- client and strategy


def _content(cfg, task, arrays, **extra):
    return RecordDict({"arrays": ArrayRecord({k: v.detach().clone() for k, v in arrays.items()}),
                       "config": ConfigRecord({"cfg": json.dumps(dict(cfg)), "task": task, "server-round": 3,
                                               **extra})})


def test_client_steps_route_train_the_selected_experts_only(ten_class_npz, tmp_path):
    cfg = _load(ten_class_npz, tmp_path)
    moe = fl.build_moe(cfg)
    state = moe.state_dict()
    out = fl.client_step(_content(cfg, "route", state), {"partition-id": 7})
    gate = out["metrics"]["gate"]
    assert out["arrays"] is None and len(gate) == 5 and abs(sum(gate) - 1) < 1e-5
    assert out["metrics"]["anchor"] == -1
    assert fl.client_step(_content(cfg, "route", state), {"partition-id": 2})["metrics"]["anchor"] == 2
    out = fl.client_step(_content(cfg, "moe", state, selected=[1, 4]), {"partition-id": 7})
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in out["arrays"] if k.startswith("experts")} == {
        "experts.1", "experts.4"}
    assert any(not torch.equal(out["arrays"][k], state[k]) for k in out["arrays"] if k.startswith("experts.1"))
    assert not any(k.startswith("common.") for k in out["arrays"])
    dense = fl.build_dense(cfg)
    out = fl.client_step(_content(cfg, "dense", dense.state_dict(), **{"proximal-mu": 0.1}), {"partition-id": 0})
    assert set(out["arrays"]) == set(dense.state_dict()) and out["metrics"]["num-examples"] == len(
        fl.federation(cfg).clients[0])
    with pytest.raises(ValueError, match="partition-id 10"):
        fl.client_step(_content(cfg, "route", state), {"partition-id": 10})


class _Reply:
    def __init__(self, node, arrays, n, loss=1.0):
        self.content = {"arrays": ArrayRecord(arrays), "metrics": {"num-examples": n, "train-loss": loss}}
        self.metadata = type("M", (), {"src_node_id": node})()

    def has_error(self):
        return False


def test_fedjets_averages_each_expert_over_the_clients_that_trained_it(ten_class_npz, tmp_path):
    cfg = _load(ten_class_npz, tmp_path)
    log = []
    strategy = fl.make_fedjets_strategy(cfg, log)
    state = {k: v.clone() for k, v in fl.build_moe(cfg).state_dict().items()}
    strategy._last_full = strategy.state = state
    strategy.sent = {11: [0, 1], 12: [1, 2]}
    w = "experts.{}.out.bias"

    def part(e_list, value):
        out = {k: torch.full_like(v, value) for k, v in state.items() if k.startswith("gate.")}
        for e in e_list:
            out.update({k: torch.full_like(v, value) for k, v in state.items() if k.startswith(f"experts.{e}.")})
        return out

    arrays, metrics = strategy.aggregate_train(5, [_Reply(11, part([0, 1], 1.0), 30), _Reply(12, part([1, 2], 4.0),
                                                                                               10)])
    new = arrays.to_torch_state_dict()
    assert torch.allclose(new[w.format(0)], torch.ones(10))  # one client
    assert torch.allclose(new[w.format(1)], torch.full((10,), 1.75))  # (30 * 1 + 10 * 4) / 40
    assert torch.allclose(new[w.format(2)], torch.full((10,), 4.0))
    assert torch.equal(new[w.format(3)], state[w.format(3)])  # untouched
    assert torch.allclose(new["gate.bias"], torch.full((5,), 1.75))
    assert torch.equal(new["common.out.bias"], state["common.out.bias"])
    assert log[-1]["expert_clients"] == "1 2 1 0 0"


# ---------------------------------------------------------------------------------- through Flower


@pytest.mark.parametrize("method", ["fedjets", "fedprox"])  # fedprox: Flower's FedProx, a FedAvg
def test_federated_command_runs_on_flowers_simulation_runtime(ten_class_npz, tmp_path, method, capsys):
    pytest.importorskip("ray")
    argv = ["--data", str(ten_class_npz), "--out", str(tmp_path), *SMALL, "--method", method]
    assert fl.main(argv) == 0
    (run_dir,) = tmp_path.glob(f"{method}-*")
    result = json.loads((run_dir / "result.json").read_text())
    assert 0 <= result["zero_shot_acc"] <= 1 and len(result["zero_shot_per_client"]) == 5
    assert result["rounds"] == 3 and (run_dir / "metrics.csv").read_text().count("\n") == 4
    if method == "fedjets":
        assert (run_dir / "routing.png").is_file() and len(result["unseen_experts"][0]) == 2
        rows = (run_dir / "metrics.csv").read_text().splitlines()
        # every mixture round trains each expert at least once: its anchor is always in the round
        for row in rows[2:]:
            assert "moe" in row and min(int(c) for c in row.split(",")[3].split()) >= 1
    else:
        assert 0 <= result["finetune_acc"] <= 1
    assert "zero-shot accuracy on unseen clients" in capsys.readouterr().out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_apps_run_on_a_superlink_and_two_supernode_processes(ten_class_npz, tmp_path):
    """Flower's own deployment on localhost: a SuperLink, two SuperNodes (partition-id 0 and 1) and
    ``flwr run`` of the app written by ``python -m gatezoo.train.federated_app``, one round."""
    import os
    import shutil
    import subprocess
    import sys
    import time
    from pathlib import Path

    from gatezoo.train import federated_app

    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "flower-superlink").exists():
        pytest.skip("flower-superlink is not installed beside this Python")
    app, home, runs = tmp_path / "app", tmp_path / "home", tmp_path / "runs"
    assert federated_app.main([str(app), "--data", str(ten_class_npz), "--out", str(runs), "--clients", "2",
                               "--classes_per_client", "5", "--unseen_clients", "2", "--unseen_images", "10",
                               "--experts", "2", "--hidden", "8", "--common_rounds", "0", "--rounds", "1",
                               "--clients_per_round", "2", "--progress", "false"]) == 0
    link = _free_port()
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "here"\n\n[superlink.here]\n'
                                      f'address = "127.0.0.1:{link}"\ninsecure = true\n')
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(home),
           "FLWR_TELEMETRY_ENABLED": "0"}
    procs = []
    try:
        procs.append(subprocess.Popen(["flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                                       "--port", str(link)], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                                      stderr=open(tmp_path / "superlink.log", "w"), start_new_session=True))
        for i in range(2):
            procs.append(subprocess.Popen(
                ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}", "--port", str(_free_port()),
                 "--node-config", f"partition-id={i} num-partitions=2"], env=env, cwd=tmp_path,
                stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"supernode{i}.log", "w"), start_new_session=True))
        deadline = time.monotonic() + 420
        submitted, tries = False, []
        while time.monotonic() < deadline and not list(runs.glob("*/result.json")):
            if not submitted and len(tries) < 5:
                r = subprocess.run(["flwr", "run", str(app), "here"], env=env, cwd=tmp_path, capture_output=True,
                                   text=True, timeout=120)
                tries.append(f"flwr run -> {r.returncode}: {r.stdout[-1500:]} {r.stderr[-1500:]}")
                submitted = r.returncode == 0
            time.sleep(2)
        results = list(runs.glob("*/result.json"))
        logs = "\n".join(p.read_text()[-3000:] for p in tmp_path.glob("*.log"))
        assert results, f"no result within 420 s; {len(tries)} submission(s): {tries[-3:]}; logs:\n{logs}"
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, 15)
            except ProcessLookupError:
                pass
        for p in procs:
            p.wait(timeout=30)
    result = json.loads(results[0].read_text())
    assert result["method"] == "fedjets" and result["rounds"] == 1 and len(result["zero_shot_per_client"]) == 2
    assert shutil.which("flwr", path=env["PATH"])


def test_write_app_gives_a_flower_app_with_the_run_config(tmp_path):
    import tomllib

    from gatezoo.train import federated_app

    path = federated_app.write_app(tmp_path / "app", [("rounds", 7), ("anchors", False)])
    doc = tomllib.loads(path.read_text())
    assert doc["tool"]["flwr"]["app"]["components"] == {"serverapp": "gatezoo.train.federated_app:server_app",
                                                        "clientapp": "gatezoo.train.federated_app:client_app"}
    conf = doc["tool"]["flwr"]["app"]["config"]
    assert conf["rounds"] == 7 and conf["anchors"] is False and conf["method"] == "fedjets" and "name" not in conf
    assert doc["project"]["dependencies"] == []  # the runtime installs nothing
    assert type(federated_app.client_app).__name__ == "ClientApp"
    assert type(federated_app.server_app).__name__ == "ServerApp"
    with pytest.raises(ConfigError, match="rounds"):
        federated_app.write_app(tmp_path / "bad", [("rounds", 0)])


def test_variant_names_the_ablation():
    base = {k: v.default for k, v in fl.FEDERATED_KEYS.items()}
    assert fl.variant(base) == "fedjets"
    assert fl.variant(dict(base, anchors=False)) == "fedjets-no-anchors"
    assert fl.variant(dict(base, anchors_every_round=False)) == "fedjets-sampled-anchors"
    assert fl.variant(dict(base, gate_features="random")) == "fedjets-random-gate"
    assert fl.variant(dict(base, method="fedprox")) == "fedprox"
