"""Bad input of the mixture-of-experts layers: config fields that cannot apply, options given
twice, and dispatch plans handed to the routing ops.

* A MoE field of a model config (``MoEOptions``) set away from its default while ``ffn`` is not
  ``"moe"`` is refused with a message naming the field and the feed-forward; defaults never are.
* One source of truth: ``router_args`` may not repeat ``k``, ``num_experts`` or ``dim``
  (``moe_k`` sizes the experts); the translation model's ``router="task_aware"`` needs
  ``router_args["num_tasks"]``.
* ``permute``, ``unpermute`` and ``expert_ffn`` check the plan they are handed (dtypes, shapes,
  offsets from 0 to the plan's rows, index ranges) before any kernel indexes with it, on the
  torch and the Triton backend (the interpreter on CPU); inside a torch.compile trace the value
  checks, which read the device, are skipped.
"""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from gatezoo.blocks import MoEFeedForward, glu_hidden_features
from gatezoo.kernels.routing import _check_plan, _unchanged, expert_ffn, grouped_mm, make_plan, permute, unpermute
from gatezoo.models import MoEOptions, TranslationConfig, ViTConfig, create_model
from gatezoo.models.registry import model_config

BACKENDS = ("torch", "triton")

# --- MoE fields without ffn="moe" --------------------------------------------------------------

# one value per MoEOptions field that differs from its default
NON_DEFAULT = {
    "num_experts": 4, "moe_k": 1, "router": "softmax", "router_args": {"noisy": True}, "moe_expert": "geglu",
    "capacity_factor": 1.25, "balance_coef": 0.1, "z_loss_coef": 1e-3, "pregated": True,
}


def test_every_moe_field_has_a_non_default_case():
    assert set(NON_DEFAULT) == {f.name for f in dataclasses.fields(MoEOptions)}


@pytest.mark.parametrize("preset, ffn", [("vit_tiny", "mlp-gelu"), ("vit_tiny_xswiglu", "xswiglu2"),
                                         ("transformer_mt_tiny", "mlp-relu")])
@pytest.mark.parametrize("field", list(NON_DEFAULT))
def test_moe_field_without_moe_ffn_is_refused(preset, ffn, field):
    value = NON_DEFAULT[field]
    msg = rf"^{field}={re.escape(repr(value))} only applies with ffn='moe', got ffn='{ffn}'"
    with pytest.raises(ValueError, match=msg):
        model_config(preset, **{field: value})
    with pytest.raises(ValueError, match=msg):
        create_model(preset, **{field: value})


def test_moe_field_refused_by_the_config_classes_too():
    with pytest.raises(ValueError, match=r"^router='gumbel' only applies with ffn='moe', got ffn='swiglu'"):
        ViTConfig(ffn="swiglu", router="gumbel").validate()
    with pytest.raises(ValueError, match=r"^capacity_factor=2.0 only applies with ffn='moe', got ffn='geglu'"):
        TranslationConfig(ffn="geglu", capacity_factor=2.0).validate()


def test_default_moe_values_without_moe_ffn_are_accepted():
    # the defaults, spelt out (z_loss_coef as the int 0 a YAML file gives), are not options set
    defaults = {"num_experts": 8, "moe_k": None, "router": "topk", "router_args": {}, "moe_expert": "swiglu",
                "capacity_factor": None, "balance_coef": 0.01, "z_loss_coef": 0, "pregated": False}
    assert model_config("vit_tiny", **defaults).ffn == "mlp-gelu"
    assert model_config("transformer_mt_tiny", **defaults).ffn == "mlp-relu"
    assert model_config("vit_tiny", ffn="moe", **NON_DEFAULT | {"moe_k": 4, "router": "topk"}).ffn == "moe"


# --- one source of truth ---------------------------------------------------------------------


@pytest.mark.parametrize("key, value, names", [
    ("k", 3, "moe_k"), ("num_experts", 4, "num_experts"), ("dim", 16, "dim"),
])
@pytest.mark.parametrize("preset", ["vit_tiny_moe", "transformer_mt_tiny_moe"])
def test_router_args_may_not_repeat_another_field(preset, key, value, names):
    with pytest.raises(ValueError, match=rf"router_args must not set '{key}' \(got {key}={value}\).*{names}"):
        model_config(preset, router_args={key: value})


@pytest.mark.parametrize("router, k", [("topk", 3), ("task_aware", 3), ("modified_softmax", 2),
                                       ("modified_softmax", None), ("softmax", None)])
def test_moe_k_sets_the_router_and_the_expert_width(router, k):
    """The router's k and the experts' width come from the one field: the hidden width of an
    expert is the dense GLU's width over the experts a token uses."""
    args = {"num_tasks": 2} if router == "task_aware" else {}
    model = create_model("vit_tiny_moe", dim=32, depth=1, num_experts=6, router=router, moe_k=k, router_args=args)
    ffn = model.blocks[0].ffn
    used = k if k is not None else 6
    assert ffn.k == ffn.router.k == used
    dense = (int(32 * 4.0) * 2 // 3 + 7) // 8 * 8  # the ViT's GLU width for mlp_ratio 4
    assert ffn.hidden_features == math.ceil(dense / used)


@pytest.mark.parametrize("key", ["dim", "num_experts"])
def test_moe_layer_refuses_its_own_arguments_in_router_args(key):
    with pytest.raises(ValueError, match=rf"router_args must not set '{key}'"):
        MoEFeedForward(8, 8, num_experts=2, router_args={key: 8})
    with pytest.raises(ValueError, match="k=2 contradicts router_args k=1"):
        MoEFeedForward(8, num_experts=4, k=2, router_args={"k": 1})
    layer = MoEFeedForward(24, num_experts=4, router_args={"k": 3})  # one k, from router_args
    assert layer.k == layer.router.k == 3
    assert layer.hidden_features == max(8, math.ceil(glu_hidden_features(24) // 3 / 8) * 8)


def test_translation_model_task_aware_router_needs_num_tasks():
    with pytest.raises(ValueError, match=r"router='task_aware' needs router_args\['num_tasks'\]"):
        create_model("transformer_mt_tiny_moe", router="task_aware")
    with pytest.raises(ValueError, match=r"router='task_aware' only applies with ffn='moe'"):
        create_model("transformer_mt_tiny", router="task_aware")


# --- dispatch plans handed to the routing ops -----------------------------------------------------


def _case(n=5, e=3, k=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(n)])
    plan = make_plan(indices, e)
    x = torch.randn(n, 4, generator=gen)
    w1 = torch.randn(e, 4, 6, generator=gen)
    w2 = torch.randn(e, 3, 4, generator=gen)
    weights = torch.rand(n, k, generator=gen)
    return plan, x, w1, w2, weights


def _bad(plan, field, value):
    return plan._replace(**{field: value})


def _broken_plans(plan):
    """(name, plan, exception, regex) for one mistake each."""
    n, k = plan.position.shape
    rows = plan.order.numel()
    token, order, position, offsets = plan.token.clone(), plan.order.clone(), plan.position.clone(), plan.offsets
    token[1] = n  # one token past the end: the Triton gather would read out of bounds
    order[0] = -1
    position[2, 1] = rows
    short = torch.cat([offsets[:-1], offsets[-1:] - 1])  # the last expert loses a row
    return [
        ("token >= N", _bad(plan, "token", token), ValueError, rf"plan.token must lie in \[0, {n}\), got values in"),
        ("negative order", _bad(plan, "order", order), ValueError, rf"plan.order must lie in \[0, {n * k}\)"),
        ("position >= rows", _bad(plan, "position", position), ValueError,
         rf"plan.position must lie in \[-1, {rows}\)"),
        ("offsets short of the rows", _bad(plan, "offsets", short), ValueError,
         rf"plan.offsets must start at 0, never decrease and end at the plan's {rows} rows"),
        ("offsets decreasing", _bad(plan, "offsets", offsets.flip(0)), ValueError, r"plan.offsets must start at 0"),
        ("offsets of int32", _bad(plan, "offsets", offsets.int()), TypeError, r"plan.offsets must be an int64 tensor"),
        ("token of float", _bad(plan, "token", plan.token.float()), TypeError, r"plan.token must be an int64 tensor"),
        ("token not a tensor", _bad(plan, "token", plan.token.tolist()), TypeError, r"plan.token must be an int64"),
        ("token shorter than order", _bad(plan, "token", plan.token[:-1]), ValueError,
         rf"plan.token must have plan.order's length {rows}"),
        ("2-d offsets", _bad(plan, "offsets", offsets[None]), ValueError, r"plan.offsets must have 1 dimension"),
        ("counts of another length", _bad(plan, "counts", plan.counts[:-1]), ValueError,
         r"plan.counts must have one entry per expert"),
        ("dropped not 0-d", _bad(plan, "dropped", plan.dropped.reshape(1)), ValueError,
         r"plan.dropped must have 0 dimension"),
    ]


CASES = [name for name, *_ in _broken_plans(_case()[0])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_routing_ops_check_the_plan_they_are_handed(case, backend):
    plan, x, w1, w2, weights = _case()
    _, bad, exc, match = next(c for c in _broken_plans(plan) if c[0] == case)
    with pytest.raises(exc, match=match):
        permute(x, bad, backend=backend)
    with pytest.raises(exc, match=match):
        unpermute(torch.randn(plan.order.numel(), 4), weights, bad, backend=backend)
    with pytest.raises(exc, match=match):
        expert_ffn(x, w1, w2, weights, bad, "silu", backend=backend)
    # the intact plan runs
    assert torch.isfinite(expert_ffn(x, w1, w2, weights, plan, "silu", backend=backend)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_ffn_refuses_a_plan_for_fewer_experts(backend):
    """A plan cut to the first two of three experts would silently drop the third expert's
    assignments: its offsets no longer reach the plan's rows."""
    plan, x, w1, w2, weights = _case()
    assert int(plan.counts[2]) > 0
    cut = plan._replace(offsets=plan.offsets[:3], counts=plan.counts[:2])
    with pytest.raises(ValueError, match=r"plan.offsets must start at 0, never decrease and end at the plan's"):
        expert_ffn(x, w1[:2], w2[:2], weights, cut, "silu", backend=backend)
    with pytest.raises(ValueError, match=r"w1 must have shape \(3, 4, 2H\) for the plan's 3 experts"):
        expert_ffn(x, w1[:2], w2[:2], weights, plan, "silu", backend=backend)


def test_plan_of_other_tokens_and_non_plans():
    plan, x, w1, w2, weights = _case()
    with pytest.raises(ValueError, match=r"x must have the plan's 5 tokens"):
        permute(x[:4], plan)
    with pytest.raises(TypeError, match=r"plan must be a DispatchPlan from make_plan, got tuple"):
        permute(x, tuple(plan))
    with pytest.raises(ValueError, match=r"plan.order has 11 rows, more than the plan's 5 x 2 assignments"):
        permute(x, plan._replace(order=torch.zeros(11, dtype=torch.long), token=torch.zeros(11, dtype=torch.long)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_plan_of_make_plan_written_in_place_is_checked_again(backend):
    """make_plan's own plans skip the value checks (no second host sync in a MoE layer) only
    while unchanged: a replaced field or an in-place write brings the checks back."""
    plan, x, w1, w2, weights = _case()
    assert _unchanged(plan) and not _unchanged(plan._replace(token=plan.token.clone()))
    plan.token[0] = 99
    assert not _unchanged(plan)
    with pytest.raises(ValueError, match=r"plan.token must lie in \[0, 5\)"):
        expert_ffn(x, w1, w2, weights, plan, "silu", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_layer_runs_under_inference_mode(backend):
    """Inference tensors have no version counter: a plan made under torch.inference_mode is not
    recorded as trusted but checked like a handed-in one, and the layer's output is unchanged."""
    torch.manual_seed(0)
    layer = MoEFeedForward(16, 24, num_experts=4, k=2, backend=backend).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = layer(x)
    with torch.inference_mode():
        got = layer(x)
        plan = make_plan(torch.tensor([[0, 1], [2, 3]]), 4)
    assert torch.equal(got, expected) and not _unchanged(plan)


def test_value_checks_are_skipped_inside_a_trace(monkeypatch):
    """A torch.compile trace cannot read values: the plan's value checks, make_plan's and
    grouped_mm's range checks step aside there (the shape and dtype checks stay)."""
    plan, x, *_ = _case()
    bad = _bad(plan, "token", plan.token + 100)
    with pytest.raises(ValueError, match="plan.token must lie"):
        _check_plan(bad, x.device, tokens=5)
    with pytest.raises(ValueError, match="indices must lie in"):
        make_plan(torch.tensor([[0, 7]]), 3)
    with pytest.raises(ValueError, match="offsets must start at 0"):
        grouped_mm(torch.randn(4, 3), torch.randn(2, 3, 5), torch.tensor([0, 3, 2]))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _check_plan(bad, x.device, tokens=5) is None
    with pytest.raises(TypeError, match=r"plan.token must be an int64 tensor"):
        _check_plan(_bad(plan, "token", plan.token.int()), x.device)
    assert make_plan(torch.tensor([[0, 2]]), 3).order.numel() == 2
