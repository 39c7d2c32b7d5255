"""The model registry and the token-mixing blocks."""

import pytest
import torch
from closeness import TOL, assert_close

from gatezoo.blocks import MixerBlock, NiNBlock, ReLAAttention, SoftmaxAttention, TokenMixing
from gatezoo.models import FFNS, create_model, list_models, model_config, vit_state_dict_from_timm

PRESETS = ["mixer_tiny", "ninformer_tiny", "ninformer_tiny_official", "vit_tiny", "vit_tiny_moe", "vit_tiny_rela",
           "vit_tiny_xswiglu", "vit_tiny_xswiglu1"]


MT_PRESETS = ["transformer_mt_tiny", "transformer_mt_tiny_moe", "transformer_mt_tiny_rela"]


CNN_PRESETS = ["cnn_small", "cnn_small_moe"]


TABULAR_PRESETS = [f"tabular_{m}{e}" for m in ("mlp", "moe", "ggmoe", "grkan_moe") for e in ("", "_ple")]


def test_registry_lists_the_presets():
    assert list_models() == sorted(PRESETS + MT_PRESETS + CNN_PRESETS + TABULAR_PRESETS)


@pytest.mark.parametrize("name", CNN_PRESETS)
def test_cnn_presets_classify_any_image_size_and_learn(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_chans=3)
    logits = model(torch.randn(16, 3, 20, 17))
    assert logits.shape == (16, 7) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.arange(16) % 7).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        if name == "cnn_small":  # top-1 experts: an expert no image chose gets no gradient
            assert p.grad.abs().sum() > 0, pname
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, H, W\)"):
        model(torch.randn(2, 1, 28, 28))


@pytest.mark.parametrize("name", PRESETS)
def test_forward_shape_finite_and_every_parameter_learns(name):
    torch.manual_seed(0)
    model = create_model(name, depth=2)
    images = torch.randn(3, 1, 28, 28)
    logits = model(images)
    assert logits.shape == (3, 10)
    assert torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 2, 3])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} gets a zero gradient"


@pytest.mark.parametrize("name", PRESETS)
def test_overrides_change_the_input_and_output(name):
    model = create_model(name, num_classes=7, in_chans=3, img_size=32, dim=32, depth=1)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert model.config.num_classes == 7 and model.model_name == name
    with pytest.raises(ValueError, match=r"images must have shape \(batch, 3, 32, 32\)"):
        model(torch.randn(2, 1, 28, 28))


@pytest.mark.parametrize("ffn", FFNS)
def test_vit_takes_every_feedforward_by_name(ffn):
    model = create_model("vit_tiny", ffn=ffn, dim=16, depth=1, heads=2)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_glu_feedforward_keeps_the_mlp_parameter_count():
    mlp = sum(p.numel() for p in create_model("vit_tiny").blocks[0].ffn.parameters())
    glu = sum(p.numel() for p in create_model("vit_tiny_xswiglu").blocks[0].ffn.parameters())
    assert abs(glu - mlp) / mlp < 0.02


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("resnet50", {}, "unknown model 'resnet50'"),
        ("vit_tiny", {"widht": 3}, r"unknown override\(s\) \['widht'\]"),
        ("vit_tiny", {"attention": "linear"}, "attention must be one of"),
        ("vit_tiny", {"ffn": "swishglu"}, "ffn must be one of"),
        ("vit_tiny", {"heads": 3}, "heads must be a positive int dividing dim"),
        ("mixer_tiny", {"img_size": 30}, "must be a multiple of patch_size"),
        ("ninformer_tiny", {"depth": 0}, "depth must be a positive int"),
    ],
)
def test_bad_configs(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model(name, **kwargs)


def test_config_and_overrides_together_are_an_error():
    from gatezoo.models import VisionTransformer, ViTConfig

    with pytest.raises(TypeError, match="either a config or field overrides"):
        VisionTransformer(ViTConfig(), depth=2)
    assert len(VisionTransformer(depth=2).blocks) == 2


@pytest.mark.parametrize("kwargs, match", [({"tokens_hidden": 0}, "tokens_hidden must be a positive int"),
                                           ({"dim": True}, "dim must be a positive int"),
                                           ({"ffn_hidden": 2.5}, "ffn_hidden must be a positive int")])
def test_hidden_sizes_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model("ninformer_tiny", **kwargs)
    with pytest.raises(ValueError, match="mlp_ratio must be a positive number"):
        create_model("vit_tiny", mlp_ratio=-1)


def test_model_config_is_the_dataclass():
    cfg = model_config("vit_tiny_rela", depth=2)
    assert cfg.attention == "rela" and cfg.depth == 2 and cfg.num_tokens == 49


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_token_mixing_block_matches_its_composition(backend):
    torch.manual_seed(1)
    block = TokenMixing(num_tokens=9, dim=12, hidden=20, backend=backend).double()
    u = torch.randn(3, 9, 12, dtype=torch.float64)
    z = block.norm(u)
    ref = u + block.fc2(torch.nn.functional.gelu(block.fc1(z.transpose(1, 2)))).transpose(1, 2)
    got = TokenMixing(num_tokens=9, dim=12, hidden=20, backend=backend)
    got.load_state_dict(block.float().state_dict())
    assert_close("block", ref, got(u.float()), TOL[torch.float32])


def test_token_mixing_dropout_runs_the_composition_in_training():
    block = TokenMixing(9, 12, 20, drop=0.5).train()
    u = torch.randn(2, 9, 12)
    assert not torch.equal(block(u), block(u))  # dropout active
    block.eval()
    assert torch.equal(block(u), block(u))


def test_ninblock_follows_the_design_formula():
    """x + Lin(z) * Mixer(z), z = LN(x), with Mixer written out (docs/architecture.md, "The math")."""
    torch.manual_seed(2)
    blk = NiNBlock(num_tokens=5, dim=8, tokens_hidden=6, channels_hidden=10).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    gelu = torch.nn.functional.gelu
    tok, ch = blk.mixer.tokens, blk.mixer.channels
    z = blk.norm1(x)
    u1 = z + (tok.fc2.weight @ gelu(tok.fc1.weight @ tok.norm(z) + tok.fc1.bias[:, None]) + tok.fc2.bias[:, None])
    u2 = u1 + ch.fc2(gelu(ch.fc1(blk.mixer.norm(u1))))
    mid = x + blk.lin(z) * u2
    ref = mid + blk.ffn(blk.norm2(mid))
    assert_close("nin", ref, blk(x), 1e-12)


def test_ninformer_official_structure():
    """shared_norm: one LayerNorm before both sub-blocks; head_norm=False: mean pool straight into the head,
    as in the authors' code."""
    torch.manual_seed(4)
    blk = NiNBlock(num_tokens=5, dim=8, tokens_hidden=6, channels_hidden=10, shared_norm=True).double()
    assert blk.norm2 is None and not any(n.startswith("norm2") for n, _ in blk.named_parameters())
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    mid = x + blk.lin(blk.norm1(x)) * blk.mixer(blk.norm1(x))
    assert_close("shared", mid + blk.ffn(blk.norm1(mid)), blk(x), 1e-12)

    model = create_model("ninformer_tiny_official", depth=1, dim=16).double()
    assert model.config.head_norm is False and model.config.shared_norm is True
    images = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    assert_close("head", model.head(model.forward_features(images).mean(1)), model(images), 1e-12)
    default = create_model("ninformer_tiny", depth=1, dim=16)
    official = create_model("ninformer_tiny_official", depth=1, dim=16)
    extra = sum(p.numel() for p in default.parameters()) - sum(p.numel() for p in official.parameters())
    assert extra == 2 * 16 * 2  # norm2 of the one block and the head's LayerNorm, weight and bias each
    with pytest.raises(ValueError, match="head_norm must be true or false"):
        create_model("ninformer_tiny", head_norm="no")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixer_block_under_bf16_autocast(backend):
    torch.manual_seed(3)
    blk = MixerBlock(num_tokens=7, dim=16, tokens_hidden=8, channels_hidden=32, backend=backend)
    u = torch.randn(2, 7, 16, requires_grad=True)
    ref = blk(u)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = blk(u)
    assert y.dtype == torch.float32  # the skip connection keeps the input's precision
    assert_close("autocast", ref, y, 2e-2)
    y.sum().backward()
    assert torch.isfinite(u.grad).all() and blk.tokens.fc1.weight.grad is not None


@pytest.mark.parametrize("attn", [SoftmaxAttention, ReLAAttention])
@pytest.mark.parametrize("kv_heads", [None, 2])
def test_fused_self_attention_equals_the_separate_projections(attn, kv_heads):
    torch.manual_seed(4)
    m = attn(32, 4, kv_heads=kv_heads, bias=True).double()
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    fused = m(x)
    assert_close("fused", m(x, context=x), fused, 1e-12)
    calls = []
    m.q.register_forward_hook(lambda *a: calls.append("q"))
    assert_close("hooked", fused, m(x), 1e-12)  # a hook turns fusion off, so it fires
    assert calls == ["q"]


def test_token_mixing_block_rejects_wrong_token_count():
    with pytest.raises(ValueError, match=r"input must have shape \(batch, 9 tokens, dim\)"):
        TokenMixing(9, 12, 20)(torch.randn(2, 8, 12))


def test_vit_tiny_computes_what_timm_vit_computes():
    """Loaded with a timm VisionTransformer's weights, vit_tiny gives timm's logits: the two
    differ only in their random initial draws."""
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    torch.manual_seed(5)
    ref = timm_vit.VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=128, depth=2,
                                     num_heads=4, mlp_ratio=4.0).eval()
    ours = create_model("vit_tiny", depth=2).eval()
    mapped = vit_state_dict_from_timm(ref.state_dict())
    assert set(mapped) == set(ours.state_dict())
    ours.load_state_dict(mapped)
    images = torch.randn(4, 1, 28, 28)
    assert_close("logits", ref(images), ours(images), 1e-5)


def test_vit_state_dict_from_timm_errors():
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    sd = timm_vit.VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=1,
                                    num_heads=2).state_dict()
    with pytest.raises(ValueError, match=r"missing \['cls_token'\]"):
        vit_state_dict_from_timm({k: v for k, v in sd.items() if k != "cls_token"})
    with pytest.raises(ValueError, match="'blocks.0.ls1.gamma' has no counterpart"):
        vit_state_dict_from_timm({**sd, "blocks.0.ls1.gamma": torch.ones(32)})
    with pytest.raises(ValueError, match="3\\*dim rows"):
        vit_state_dict_from_timm({**sd, "blocks.0.attn.qkv.bias": torch.ones(95)})
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        vit_state_dict_from_timm([1, 2])


def _active_ffn_params(model) -> int:
    """Feed-forward weights one token uses in the first block (a MoE layer: k experts' worth)."""
    ffn = model.blocks[0].ffn
    if hasattr(ffn, "w1"):
        return (ffn.w1[0].numel() + ffn.w2[0].numel()) * ffn.k
    return sum(p.numel() for name, p in ffn.named_parameters() if name.endswith("weight"))


@pytest.mark.parametrize("router", ["topk", "softmax", "modified_softmax", "gumbel", "adaptive_threshold", "grkan"])
def test_vit_tiny_moe_active_parameters_match_the_dense_feedforward(router):
    # 8 experts; a token uses k of them (top-2) or all 8 (the dense routers), each sized so that the
    # active weights match vit_tiny's dense feed-forward within the rounding to multiples of 8
    model = create_model("vit_tiny_moe", router=router)
    ffn = model.blocks[0].ffn
    assert ffn.num_experts == 8 and ffn.k == (2 if router == "topk" else 8)
    dense = _active_ffn_params(create_model("vit_tiny"))
    assert abs(_active_ffn_params(model) - dense) / dense < 0.04
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_moe_models_pregated_and_aux_loss():
    from gatezoo.blocks import moe_aux_loss

    model = create_model("vit_tiny_moe", depth=3, pregated=True)
    ffns = [b.ffn for b in model.blocks]
    assert ffns[0]._pregate_next is ffns[1] and ffns[1]._pregate_next is ffns[2] and ffns[2]._pregate_next is None
    model(torch.randn(2, 1, 28, 28))
    assert moe_aux_loss(model) > 0
    mt = create_model("transformer_mt_tiny_moe", vocab_size=64, pregated=True, dim=32, heads=2)
    assert mt.encoder[0].ffn._pregate_next is mt.encoder[1].ffn
    assert mt.encoder[-1].ffn._pregate_next is None and mt.decoder[0].ffn._pregate_next is mt.decoder[1].ffn
    assert mt(torch.randint(4, 64, (2, 7)), torch.randint(4, 64, (2, 5))).shape == (2, 5, 64)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_experts": 0}, "num_experts must be a positive int"),
    ({"router": "hash"}, "router must be one of"),
    ({"moe_k": 9}, r"moe_k must be an int in \[1, num_experts=8\]"),
    ({"router": "softmax", "moe_k": 2}, "moe_k=2 needs a selecting router"),
    ({"balance_coef": -1.0}, "balance_coef must be a number >= 0"),
    ({"pregated": "yes"}, "pregated must be true or false"),
])
def test_bad_moe_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model("vit_tiny_moe", **kwargs)
    with pytest.raises(ValueError, match=match):
        create_model("transformer_mt_tiny_moe", vocab_size=64, **kwargs)


def test_moe_models_initialise_experts_like_the_dense_layers_and_keep_router_init():
    vit = create_model("vit_tiny_moe", router_args={"noisy": True})
    ffn = vit.blocks[0].ffn
    assert abs(ffn.w1.std().item() - 0.02) < 0.002 and abs(ffn.w2.std().item() - 0.02) < 0.002
    assert ffn.router.noise.weight.abs().max() == 0  # the noisy router starts without noise
    mt = create_model("transformer_mt_tiny_moe", vocab_size=64, router_args={"noisy": True})
    ffn = mt.encoder[0].ffn
    d, two_h = ffn.w1.shape[1:]
    bound = (6 / (d + two_h)) ** 0.5  # xavier_uniform on each expert's (d, 2h) matrix
    assert ffn.w1.abs().max() <= bound and ffn.w1.abs().max() > 0.9 * bound
    assert ffn.router.noise.weight.abs().max() == 0
