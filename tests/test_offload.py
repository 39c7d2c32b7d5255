"""Expert offloading (gatezoo.models.offload) and its benchmark (python -m gatezoo.eval.bench_moe --offload)."""

from __future__ import annotations

import copy
import csv

import pytest
import torch

from gatezoo.blocks import MoEFeedForward, PreGatedMoEStack
from gatezoo.eval import bench_moe
from gatezoo.models.offload import expert_bytes, moe_layers_of, offload_experts, save_experts

DIM = 12


def _stack(layers=3, experts=5, k=2, seed=0, **kw):
    torch.manual_seed(seed)
    mods = [MoEFeedForward(DIM, 10, num_experts=experts, k=k, router="topk", backend="torch", **kw)
            for _ in range(layers)]
    return PreGatedMoEStack(mods).eval()


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, DIM, generator=g) for n in (1, 1, 4, 1, 9, 1, 2)]


@pytest.fixture
def saved(tmp_path):
    def make(stack):
        path = tmp_path / f"experts-{id(stack)}.safetensors"
        save_experts(stack, path)
        return path
    return make


@pytest.mark.parametrize("policy", ["on_demand", "prefetch"])
@pytest.mark.parametrize("cache", [5, 7, 15])
@pytest.mark.parametrize("kw", [{}, {"bias": True, "expert": "mlp-gelu"}])
def test_offloaded_outputs_equal_the_resident_model_bit_for_bit(saved, policy, cache, kw):
    stack = _stack(**kw)
    xs = _inputs()
    with torch.no_grad():
        ref = [stack(x) for x in xs]
    path = saved(stack)
    model = copy.deepcopy(stack)
    off = offload_experts(model, path, cache_experts=cache, policy=policy)
    assert all(layer.w1.numel() == 0 for _, layer in moe_layers_of(model))  # the experts left the model
    with torch.no_grad():
        out = [model(x) for x in xs]
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    st = off.stats
    assert st.split_blocks == 0
    assert st.uses == st.hits + st.prefetched + st.fetched_at_use
    assert st.fetched_bytes == st.fetches * expert_bytes(stack.layers[0])
    assert st.resident_bytes == cache * expert_bytes(stack.layers[0])
    off.close(restore=True)
    with torch.no_grad():
        assert all(torch.equal(model(x), r) for x, r in zip(xs, ref))
    for (name, a), (_, b) in zip(model.state_dict().items(), stack.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("policy", ["on_demand", "prefetch"])
@pytest.mark.parametrize("kw", [{}, {"bias": True, "expert": "mlp-gelu"}])
def test_a_cache_smaller_than_a_block_computes_it_in_parts(saved, policy, kw):
    stack = _stack(**kw)
    xs = _inputs()
    with torch.no_grad():
        ref = [stack(x) for x in xs]
    model = copy.deepcopy(stack)
    off = offload_experts(model, saved(stack), cache_experts=2, policy=policy)
    with torch.no_grad():
        out = [model(x) for x in xs]
    assert off.stats.split_blocks > 0  # 9 tokens need more than 2 experts in a layer
    for x, a, b in zip(xs, out, ref):
        if x.shape[0] == 1 or not kw:  # one token's two experts fit; a float32 GLU's activation runs by rows
            assert torch.equal(a, b)
        else:  # the activation of a part may round differently in the last bit
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    off.close()


def test_bf16_experts_offload_bit_for_bit(saved):
    stack = _stack().to(torch.bfloat16)
    xs = [x.bfloat16() for x in _inputs()]
    with torch.no_grad():
        ref = [stack(x) for x in xs]
    model = copy.deepcopy(stack)
    off = offload_experts(model, saved(stack), cache_experts=5, policy="prefetch")
    with torch.no_grad():
        assert all(torch.equal(model(x), r) for x, r in zip(xs, ref))
    assert off.stats.split_blocks == 0
    off.close()


def test_prefetch_fetches_the_next_layers_experts_ahead(saved):
    stack = _stack(layers=2, experts=6)
    x = _inputs()[4]  # 9 tokens
    with torch.no_grad():
        stack(x)
    used = [torch.unique(layer.last_routing.indices).numel() for layer in stack.layers]
    model = copy.deepcopy(stack)
    off = offload_experts(model, saved(stack), cache_experts=12, policy="prefetch")
    with torch.no_grad():
        model(x)
    # layer 0 has no pre-gate: its experts are fetched for its own run; layer 1's came ahead
    assert off.stats.fetched_at_use == used[0]
    assert off.stats.prefetched == used[1]
    assert off.stats.per_layer_fetches == used
    off.close()


def test_on_demand_reuses_cached_experts(saved):
    stack = _stack()
    x = _inputs()[0]
    model = copy.deepcopy(stack)
    off = offload_experts(model, saved(stack), cache_experts=15, policy="on_demand")
    with torch.no_grad():
        model(x)
        model(x)
    st = off.stats
    assert st.prefetched == 0 and st.hits >= st.uses // 2  # the second pass finds every expert cached
    off.clear()
    off.reset_stats()
    with torch.no_grad():
        model(x)
    assert off.stats.hits == 0
    off.close()


def test_the_throttled_tier_holds_each_fetch_to_its_bandwidth(saved):
    stack = _stack()
    bandwidth = 2e6  # bytes per second: an expert of ~2 KB takes ~1 ms
    model = copy.deepcopy(stack)
    off = offload_experts(model, saved(stack), cache_experts=4, policy="on_demand", tier="throttled",
                          bandwidth=bandwidth)
    with torch.no_grad():
        model(_inputs()[2])
    assert off.stats.fetched_bytes > 0
    assert off.stats.wait_s >= off.stats.fetched_bytes / bandwidth
    off.close()


def test_offloading_refuses_what_it_cannot_serve(saved, tmp_path):
    stack = _stack()
    path = saved(stack)
    with pytest.raises(ValueError, match="cache_experts"):
        offload_experts(copy.deepcopy(stack), path, cache_experts=0)
    with pytest.raises(ValueError, match="policy"):
        offload_experts(copy.deepcopy(stack), path, cache_experts=2, policy="lazy")
    with pytest.raises(ValueError, match="tier"):
        offload_experts(copy.deepcopy(stack), path, cache_experts=2, tier="tape")
    with pytest.raises(ValueError, match="bandwidth"):
        offload_experts(copy.deepcopy(stack), path, cache_experts=2, tier="throttled")
    with pytest.raises(ValueError, match="bandwidth applies only"):
        offload_experts(copy.deepcopy(stack), path, cache_experts=2, bandwidth=1e9)
    with pytest.raises(FileNotFoundError, match="save_experts"):
        offload_experts(copy.deepcopy(stack), tmp_path / "missing.safetensors", cache_experts=2)
    with pytest.raises(ValueError, match="eval"):
        offload_experts(copy.deepcopy(stack).train(), path, cache_experts=2)
    with pytest.raises(ValueError, match="holds the experts of layers"):
        offload_experts(_stack(layers=2), path, cache_experts=2)
    with pytest.raises(ValueError, match="shape"):
        offload_experts(_stack(experts=6), path, cache_experts=2)
    with pytest.raises(ValueError, match="no MoEFeedForward"):
        offload_experts(torch.nn.Linear(2, 2), path, cache_experts=2)
    model = copy.deepcopy(stack)
    off = offload_experts(model, path, cache_experts=2)
    with pytest.raises(ValueError, match="offloaded already"):
        offload_experts(model, path, cache_experts=2)
    with pytest.raises(RuntimeError, match="inference only"):
        model(torch.randn(2, DIM, requires_grad=True))
    off.close()


def test_the_offload_benchmark_writes_identical_rows(tmp_path):
    out = tmp_path / "offload"
    rc = bench_moe.main(["--offload", "--model_args", '{"dim": 32, "vocab_size": 300, "ffn_hidden": 64, '
                         '"enc_layers": 2, "dec_layers": 2, "max_len": 64}', "--sentences", "2", "--rounds", "1",
                         "--cache", "0.25", "--out", str(out), "--no-progress"])
    assert rc == 0
    rows = list(csv.DictReader(open(f"{out}.csv")))
    assert [(r["policy"], r["cache_experts"]) for r in rows] == [("resident", "32"), ("on_demand", "8"),
                                                                 ("prefetch", "8")]
    assert all(r["identical"] == "True" for r in rows)
    assert float(rows[1]["fetched_mib_per_token"]) > 0 and float(rows[0]["fetched_mib_per_token"]) == 0
    assert (tmp_path / "offload.png").is_file()


@pytest.mark.parametrize("argv, message", [
    ([], "pass --offload"),
    (["--offload", "--sentences", "0"], "--sentences must be >= 1"),
    (["--offload", "--tier", "throttled"], "--bandwidth"),
    (["--offload", "--bandwidth", "1e9"], "applies only to --tier throttled"),
    (["--offload", "--model_args", "[1]"], "JSON object"),
    (["--offload", "--run", "/nonexistent/run"], "not found"),
])
def test_the_offload_benchmark_refuses_bad_options(argv, message, capsys):
    assert bench_moe.main(argv) == 2
    assert message in capsys.readouterr().err
