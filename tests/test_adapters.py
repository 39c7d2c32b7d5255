"""The adapters command: one LoRA expert of gatezoo's MoLELinear is peft's LoRA (outputs and
gradients in float64), the wrapping touches exactly the targeted linear layers and freezes the rest,
the trainable-parameter counts by hand, a tiny end-to-end run, and the refused options."""

import csv
import json

import pytest
import torch
from torch import nn

from gatezoo.blocks import MoLELinear
from gatezoo.models import create_model
from gatezoo.train import adapters
from gatezoo.train.core.config import load_config
from gatezoo.train.core.factory import count_params

TINY_VIT = {"dim": 16, "depth": 2, "heads": 2, "img_size": 8, "patch_size": 4, "in_chans": 1, "num_classes": 3}
TARGETS = ["q", "kv", "proj", "fc1", "fc2"]
# (in, out) of the targeted layers of one block of TINY_VIT: q, kv, proj, fc1 (4x), fc2
SHAPES = [(16, 16), (16, 32), (16, 16), (16, 64), (64, 16)]


class _One(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.lin(x)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# float64 throughout (the routing ops sum float64 inputs in float64): agreement to rounding
TOL = 1e-12


@pytest.mark.parametrize("router", ["softmax", "topk", "adaptive_threshold"])
def test_single_expert_mole_is_peft_lora(router):
    """With one expert every router gives it weight exactly 1 (softmax over one logit; AdaMoLE:
    relu(1 - tau) / relu(1 - tau)), so MoLELinear is LoRA: same output and gradients as peft's
    LoRA layer holding the same A, B and scaling alpha / r."""
    peft = pytest.importorskip("peft", reason="peft (the 'adapters' extra) is not installed")
    torch.manual_seed(0)
    d_in, d_out, r, alpha = 13, 11, 3, 5.0
    net = _One(d_in, d_out).double()
    net = peft.inject_adapter_in_model(peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"]), net)
    a, b = net.lin.lora_A["default"].weight, net.lin.lora_B["default"].weight  # (r, in), (out, r)
    with torch.no_grad():
        a.normal_()
        b.normal_()  # peft starts B at zero, which would hide a wrong B
    router_args = {"k": 1} if router == "topk" else None
    mole = MoLELinear(d_in, d_out, num_experts=1, rank=r, alpha=alpha, router=router, router_args=router_args,
                      dtype=torch.float64)
    with torch.no_grad():
        mole.base.weight.copy_(net.lin.base_layer.weight)
        mole.base.bias.copy_(net.lin.base_layer.bias)
        mole.lora_a.copy_(a.t()[None])
        mole.lora_b.copy_(b.t()[None])
        for p in mole.router.parameters():
            p.normal_()
    x1 = torch.randn(2, 7, d_in, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y_peft, y_mole = net(x1), mole(x2)
    assert _rel(y_mole.detach(), y_peft.detach()) < TOL
    g = torch.randn_like(y_peft)
    y_peft.backward(g)
    y_mole.backward(g)
    assert _rel(x2.grad, x1.grad) < TOL
    assert _rel(mole.lora_a.grad[0], a.grad.t()) < TOL
    assert _rel(mole.lora_b.grad[0], b.grad.t()) < TOL


def _cfg(**over):
    args = []
    for k, v in over.items():
        args += [f"--{k}", str(v)]
    return load_config(None, args, keys=adapters.ADAPTER_KEYS)


@pytest.mark.parametrize("method", adapters.METHODS)
def test_wrapping_replaces_the_targets_freezes_the_rest_and_counts_by_hand(method):
    if method == "lora":
        pytest.importorskip("peft", reason="peft (the 'adapters' extra) is not installed")
    cfg = _cfg(lora_rank=5, num_experts=3, expert_rank=2, top_k=2)
    torch.manual_seed(0)
    model = create_model("vit_tiny", **TINY_VIT)
    x = torch.randn(4, 1, 8, 8)
    before = model(x).detach()
    expected_names = [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.q", "attn.kv", "attn.proj", "ffn.fc1",
                                                                   "ffn.fc2")]
    assert adapters.target_linears(model, TARGETS) == expected_names
    model = adapters.prepare(model, method, cfg)
    head = 16 * 3 + 3
    sum_io = 2 * sum(i + o for i, o in SHAPES)  # two blocks
    sum_in = 2 * sum(i for i, _ in SHAPES)
    layers = 2 * len(SHAPES)
    expected = {"head": head, "full": sum(p.numel() for p in model.parameters()), "lora": 5 * sum_io + head,
                "mole_topk": 3 * 2 * sum_io + 3 * sum_in + head,
                "adamole": 3 * 2 * sum_io + 3 * sum_in + (sum_in + layers) + head}[method]
    assert count_params(model) == expected
    modules = dict(model.named_modules())
    if method in ("mole_topk", "adamole"):
        wrapped = sorted(n for n, m in modules.items() if isinstance(m, MoLELinear))
        assert wrapped == sorted(expected_names)
        router = "TopKRouter" if method == "mole_topk" else "AdaptiveThresholdRouter"
        assert all(type(modules[n].router).__name__ == router for n in wrapped)
    if method == "lora":
        from peft.tuners.lora import LoraLayer

        assert sorted(n for n, m in modules.items() if isinstance(m, LoraLayer)) == sorted(expected_names)
        assert not isinstance(modules["head"], LoraLayer) and isinstance(modules["patch_embed.proj"], nn.Conv2d)
    for name, p in model.named_parameters():
        adapter = "lora_" in name or ".router." in name
        should = method == "full" or name.startswith("head.") or (method in adapters.ADAPTER_METHODS and adapter)
        assert p.requires_grad == should, name
    if method in adapters.ADAPTER_METHODS:  # B starts at zero: the wrapped model computes what it did
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


def _tiny_args(tiny_npz, tmp_path, *extra):
    return ["--data", str(tiny_npz), "--out", str(tmp_path), "--model_args",
            "{dim: 16, depth: 1, heads: 2, patch_size: 4}", "--pretrain_classes", "[0, 1]", "--finetune_classes",
            "[1, 2]", "--train_images", "20", "--valid_images", "8", "--epochs", "2", "--batch_size", "8",
            "--pretrain_epochs", "1", "--lora_rank", "3", "--num_experts", "2", "--expert_rank", "1", "--top_k", "1",
            "--progress", "false", "--max_steps", "2", *extra]


def test_tiny_run_writes_its_results(tiny_npz, tmp_path):
    pytest.importorskip("peft", reason="peft (the 'adapters' extra) is not installed")
    bench = tmp_path / "bench" / "adapters"
    assert adapters.main(_tiny_args(tiny_npz, tmp_path, "--seeds", "[0, 1]", "--bench", str(bench))) == 0
    run_dir = next(p for p in tmp_path.iterdir() if p.name.startswith("adapters-"))
    with open(run_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["seed"], r["method"]) for r in rows] == [(s, m) for s in "01" for m in adapters.METHODS]
    assert all(0 <= float(r["test_acc"]) <= 1 for r in rows)
    lora = next(int(r["trainable"]) for r in rows if r["method"] == "lora")
    ada = next(r for r in rows if r["method"] == "adamole")
    assert abs(float(ada["ratio_to_lora"]) - int(ada["trainable"]) / lora) < 1e-4
    topk = next(r for r in rows if r["method"] == "mole_topk")
    assert float(topk["experts_per_token"]) == 1.0  # top_k 1
    assert 1.0 <= float(ada["experts_per_token"]) <= 2.0 and float(ada["no_expert_share"]) == 0.0
    result = json.loads((run_dir / "result.json").read_text())
    assert [s["method"] for s in result["summary"]] == list(adapters.METHODS) and result["goal"]["checked"]
    for name in ("metrics.csv", "summary.csv", "adapters.png", "config.yaml", "pretrain/last.safetensors"):
        assert (run_dir / name).is_file(), name
    for suffix in (".csv", "-summary.csv", ".png"):
        assert bench.with_name("adapters" + suffix).is_file()
    # the pretrained model of that run is reused (no pretrain/ folder in the new run)
    assert adapters.main(_tiny_args(tiny_npz, tmp_path, "--pretrained", str(run_dir), "--methods", "[head]",
                                    "--seeds", "[3]", "--name", "again")) == 0
    again = next(p for p in tmp_path.iterdir() if p.name.startswith("again-"))
    assert (again / "results.csv").is_file() and not (again / "pretrain").exists()


@pytest.mark.parametrize("extra, words", [
    (["--methods", "[lora, dora]"], "unknown method"),
    (["--methods", "[head, head]"], "distinct"),
    (["--num_experts", "2", "--top_k", "3"], "top_k"),
    (["--targets", "[qkv]"], "match no nn.Linear"),
    (["--rotate", "45"], "rotate"),
    (["--train_images", "100000"], "train_images + valid_images"),
    (["--finetune_classes", "[2]"], "finetune_classes"),
    (["--finetune_classes", "[1, 7]"], "finetune_classes"),
    (["--pretrained", "/nonexistent/run"], "pretrained"),
    (["--expert-rank", "2"], "underscores"),
    (["--lr", "0"], "lr"),
], ids=["unknown-method", "duplicate", "top_k", "targets", "rotate", "too-many-images", "one-class", "no-class",
        "pretrained", "hyphen", "lr"])
def test_bad_options_are_refused(tiny_npz, tmp_path, capsys, extra, words):
    assert adapters.main(_tiny_args(tiny_npz, tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and words in err, err
    assert not any(tmp_path.glob("adapters-*"))  # refused before any run directory
