"""ONNX export with the dynamo exporter (``torch.onnx.export(..., dynamo=True)``) of every
registry model and every router, checked against the eager model (docs/export.md).

Needs ``onnx`` and ``onnxscript`` (skipped without them). With ``onnxruntime`` the exported
graph runs and its output is compared with the eager model's; without it the graph only goes
through ``onnx.checker``. The models are tiny (width 16, one layer, 8x8 images or sentences
of a few tokens) and in eval mode.
"""

import logging
import warnings

import pytest
import torch

pytest.importorskip("onnx", reason="ONNX export needs the onnx package (pip install onnx onnxscript)")
pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript (pip install onnx onnxscript)")

import onnx  # noqa: E402

from gatezoo.blocks import ROUTERS, set_task_ids  # noqa: E402
from gatezoo.models import create_model, list_models  # noqa: E402

try:
    import onnxruntime
except ImportError:  # pragma: no cover - depends on the environment
    onnxruntime = None

ROUTER_ARGS = {"task_aware": {"num_tasks": 3}}


def _tiny(name: str, **over):
    if name.startswith("transformer_mt"):
        model = create_model(name, vocab_size=40, dim=16, enc_layers=1, dec_layers=1, heads=2, ffn_hidden=32,
                             max_len=12, **over)
        return model.eval(), (torch.randint(4, 40, (2, 5)), torch.randint(4, 40, (2, 4)))
    if name.startswith("tabular"):
        model = create_model(name, num_features=5, num_outputs=3, width=8, bins=4, emb_dim=2, **over).eval()
        return model, (torch.randn(2, 5),)
    if name.startswith("cnn"):
        return create_model(name, width=4, depths=[1, 1], img_size=8, **over).eval(), (torch.randn(2, 1, 8, 8),)
    args = {"dim": 16, "depth": 1, "img_size": 8, "patch_size": 4, **over}
    if name.startswith("vit"):
        args.setdefault("heads", 2)
    return create_model(name, **args).eval(), (torch.randn(2, 1, 8, 8),)


def _export(model, inputs, dynamic_shapes=None) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)  # the exporter's progress lines
        try:
            program = torch.onnx.export(model, inputs, dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False)
        finally:
            logging.disable(logging.NOTSET)
    proto = program.model_proto
    onnx.checker.check_model(proto)
    return proto


def _check_runs(proto: onnx.ModelProto, model, batches) -> None:
    """Each batch (a tuple of inputs) through onnxruntime against the eager model."""
    if onnxruntime is None:  # pragma: no cover - onnx.checker above is all there is
        return
    session = onnxruntime.InferenceSession(proto.SerializeToString())
    names = [i.name for i in session.get_inputs()]
    for inputs in batches:
        got = session.run(None, {name: t.numpy() for name, t in zip(names, inputs)})[0]
        with torch.no_grad():
            ref = model(*inputs)
        assert got.shape == tuple(ref.shape)
        err = float((torch.from_numpy(got) - ref).norm() / ref.norm())
        assert err < 1e-5, err


@pytest.mark.parametrize("name", list_models())
def test_every_registry_model_exports(name):
    model, inputs = _tiny(name)
    _check_runs(_export(model, inputs), model, [inputs])


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_every_router_exports(router):
    model, inputs = _tiny("vit_tiny_moe", num_experts=4, router=router, router_args=ROUTER_ARGS.get(router, {}))
    if router == "task_aware":
        set_task_ids(model, 1)
    _check_runs(_export(model, inputs), model, [inputs])


def test_task_level_router_and_its_extracted_model_export():
    """TaskAwareRouter(mode="task"): the model with its task ids, and a task's sub-network."""
    from gatezoo.models import extract_task_model

    model, inputs = _tiny("vit_tiny_moe", num_experts=4, router="task_aware",
                          router_args={**ROUTER_ARGS["task_aware"], "mode": "task"})
    set_task_ids(model, 1)
    _check_runs(_export(model, inputs), model, [inputs])
    sub = extract_task_model(model, 1).eval()
    _check_runs(_export(sub, inputs), sub, [inputs])
    with torch.no_grad():
        assert torch.allclose(sub(*inputs), model(*inputs), rtol=1e-5, atol=1e-6)


def test_moe_vit_exports_with_a_dynamic_batch():
    """The capacity (ceil(c N k / E)) follows the batch size of the exported graph."""
    model, (x,) = _tiny("vit_tiny_moe", num_experts=4, capacity_factor=0.75, moe_k=1)
    proto = _export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    _check_runs(proto, model, [(torch.randn(b, 1, 8, 8),) for b in (2, 3, 5)])


def test_moe_translation_model_exports_with_dynamic_batch_and_lengths():
    model, inputs = _tiny("transformer_mt_tiny_moe", num_experts=3, capacity_factor=1.25)
    batch, src, tgt = torch.export.Dim("batch"), torch.export.Dim("src", max=12), torch.export.Dim("tgt", max=12)
    proto = _export(model, inputs, dynamic_shapes=({0: batch, 1: src}, {0: batch, 1: tgt}))
    _check_runs(proto, model, [(torch.randint(4, 40, (b, s)), torch.randint(4, 40, (b, t)))
                               for b, s, t in ((2, 5, 4), (3, 7, 2))])
