"""Bad input everywhere a user can reach in the blocks, the models and the data loaders.

The rule: a wrong type raises TypeError, a wrong value or shape raises ValueError (a data file
that is there but unusable raises DataFormatError, itself a ValueError), and every message
names the argument (or the file) and what was expected. An empty batch gives an empty output
of the right shape. The mistakes come in three classes, each a parametrised table of
``(call, expected exception, regex naming the argument)``:

* ``SILENT``: values that were once accepted silently: a size of 0 replaced by a default, the
  string ``"false"`` taken as true, a float or a negative number as a size, dropout outside
  [0, 1), a non-numeric or non-positive ``eps``;
* ``FOREIGN``: mistakes that once surfaced as an unrelated PyTorch error (a RuntimeError from a
  reshape, a matmul or a convolution, an IndexError from an embedding) or no error at all, at
  forward time; ``EMPTY`` holds the empty batches, which must give empty outputs;
* ``DATA``: data files (and the data and text helpers) that were once accepted or failed with a
  zipfile or numpy traceback.

``BAD_INPUTS`` at the end lists every case of the three tables and ``EMPTY``.

Tensors are tiny, and the blocks run on ``backend="torch"`` except for one case on Triton (the
interpreter on CPU).
"""

from __future__ import annotations

import re
import zipfile

import numpy as np
import pytest
import torch

from gatezoo.blocks import (
    GRKAN,
    GatedAct,
    GatedRMSNorm,
    GLUFeedForward,
    GumbelSoftmaxRouter,
    KANLayer,
    KVCache,
    MixerBlock,
    Mlp,
    MoEFeedForward,
    MoLELinear,
    NiNBlock,
    PreGatedMoEStack,
    ReLAAttention,
    RMSNorm,
    SoftmaxAttention,
    TokenMixing,
    TopKRouter,
    glu_hidden_features,
)
from gatezoo.blocks.moe import link_pregated
from gatezoo.models import (
    EncoderDecoder,
    PatchEmbed,
    VisionTransformer,
    ViTBlock,
    create_model,
    model_config,
    sinusoidal_positions,
)
from gatezoo.train.data import text
from gatezoo.train.data.images import Batches, DataFormatError, holdout_split, load_dataset, write_idx

T = "torch"  # the backend of the blocks in these tests


# --- tiny models and inputs --------------------------------------------------------------------


IMAGE = {"img_size": 8, "patch_size": 4, "dim": 8, "depth": 1}


def vit(name: str = "vit_tiny", **kw):
    return create_model(name, **{**IMAGE, "heads": 2, **kw})


def mixer(**kw):
    return create_model("mixer_tiny", **{**IMAGE, "tokens_hidden": 4, "channels_hidden": 8, **kw})


def nin(**kw):
    return create_model("ninformer_tiny", **{**IMAGE, "tokens_hidden": 4, "channels_hidden": 8, "ffn_hidden": 8, **kw})


def mt(**kw):
    return create_model("transformer_mt_tiny", **{"vocab_size": 16, "dim": 8, "heads": 2, "enc_layers": 1,
                                                  "dec_layers": 1, "ffn_hidden": 16, "max_len": 16, **kw})


def images(b: int = 2, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(b, 1, 8, 8).to(dtype)


def ids(b: int = 2, t: int = 3) -> torch.Tensor:
    return torch.randint(4, 16, (b, t))


def x3(b: int = 2, t: int = 3, d: int = 8, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(b, t, d).to(dtype)


def twice(first, second):
    """Call ``first()`` then ``second()`` (a cache filled by one call, misused by the next)."""
    first()
    return second()


def kv_batch_change(attn):
    cache = KVCache()
    return twice(lambda: attn(x3(2, 1), cache=cache), lambda: attn(x3(3, 1), cache=cache))


def cross_batch_change(attn):
    cache = KVCache()
    return twice(lambda: attn(x3(2, 1), context=x3(2, 4), cache=cache),
                 lambda: attn(x3(3, 1), context=x3(3, 4), cache=cache))


def reorder(index):
    cache = KVCache()
    SoftmaxAttention(8, 2)(x3(2, 1), cache=cache)
    return cache.reorder(index)


def moe_stack(**kw):
    layers = [MoEFeedForward(8, 8, num_experts=2, backend=T) for _ in range(2)]
    return PreGatedMoEStack(layers, **kw)


def decode_step_with_other_batch():
    model = mt()
    memory = model.encode(ids(2, 3))
    _, cache = model.decode_step(torch.full((2, 1), 2), memory)
    return model.decode_step(torch.full((3, 1), 5), model.encode(ids(3, 3)), cache)


def batches(**kw):
    args = {"images": torch.zeros(4, 1, 2, 2, dtype=torch.uint8), "labels": torch.zeros(4, dtype=torch.long),
            "batch_size": 2, "mean": [0.5], "std": [0.25]}
    return Batches(**{**args, **kw})


# --- silent acceptance ---------------------------------------------------------------------------

SILENT = [
    # sizes: 0 replaced by a default, floats, negatives
    ("mixer channels_hidden=0", lambda: MixerBlock(4, 8, 4, channels_hidden=0, backend=T), ValueError,
     r"channels_hidden must be a positive int, got 0"),
    ("mixer channels_hidden=2.5", lambda: MixerBlock(4, 8, 4, 2.5, backend=T), TypeError, r"channels_hidden"),
    ("mixer channels_hidden=-3", lambda: MixerBlock(4, 8, 4, -3, backend=T), ValueError, r"channels_hidden"),
    ("mixer tokens_hidden=0", lambda: MixerBlock(4, 8, 0, 8, backend=T), ValueError, r"tokens_hidden"),
    ("nin ffn_hidden=0", lambda: NiNBlock(4, 8, 4, 8, ffn_hidden=0, backend=T), ValueError, r"ffn_hidden"),
    ("nin ffn_hidden=-1", lambda: NiNBlock(4, 8, 4, 8, ffn_hidden=-1, backend=T), ValueError, r"ffn_hidden"),
    ("nin ffn_hidden=8.0", lambda: NiNBlock(4, 8, 4, 8, ffn_hidden=8.0, backend=T), TypeError, r"ffn_hidden"),
    ("token mixing num_tokens=4.0", lambda: TokenMixing(4.0, 8, 4, backend=T), TypeError, r"num_tokens"),
    ("token mixing dim=True", lambda: TokenMixing(4, True, 4, backend=T), TypeError, r"dim"),
    ("mlp hidden_features=0", lambda: Mlp(8, 0), ValueError, r"hidden_features must be a positive int"),
    ("mlp hidden_features=16.5", lambda: Mlp(8, 16.5), TypeError, r"hidden_features"),
    ("mlp out_features=0", lambda: Mlp(8, 16, 0), ValueError, r"out_features must be a positive int"),
    ("mlp in_features=8.0", lambda: Mlp(8.0), TypeError, r"in_features"),
    ("mlp in_features=-8", lambda: Mlp(-8), ValueError, r"in_features"),
    ("glu hidden_features=0", lambda: GLUFeedForward(8, 0, backend=T), ValueError, r"hidden_features"),
    ("glu hidden_features=-16", lambda: GLUFeedForward(8, -16, backend=T), ValueError, r"hidden_features"),
    ("glu hidden_features=16.0", lambda: GLUFeedForward(8, 16.0, backend=T), TypeError, r"hidden_features"),
    ("glu out_features=0", lambda: GLUFeedForward(8, 16, 0, backend=T), ValueError, r"out_features"),
    ("glu in_features=8.0", lambda: GLUFeedForward(8.0, backend=T), TypeError, r"in_features"),
    ("glu_hidden_features(0)", lambda: glu_hidden_features(0), ValueError, r"dim must be a positive int"),
    ("rms dim=0", lambda: RMSNorm(0, backend=T), ValueError, r"dim must be a positive int"),
    ("gated rms dim=8.0", lambda: GatedRMSNorm(8.0, backend=T), TypeError, r"dim"),
    ("attention heads=2.0", lambda: SoftmaxAttention(8, 2.0), TypeError, r"heads"),
    ("attention heads=-2", lambda: ReLAAttention(8, -2, backend=T), ValueError, r"heads"),
    ("attention head_dim=0", lambda: SoftmaxAttention(8, 2, head_dim=0), ValueError, r"head_dim"),
    ("attention dim=8.0", lambda: SoftmaxAttention(8.0, 2), TypeError, r"dim"),
    ("kan in_features=4.0", lambda: KANLayer(4.0, 4), TypeError, r"in_features"),
    ("grkan hidden=0", lambda: GRKAN(4, 0), ValueError, r"hidden"),
    ("moe hidden_features=0", lambda: MoEFeedForward(8, 0, num_experts=2, backend=T), ValueError,
     r"hidden_features"),
    # bools: a string (or a number) where a bool belongs
    ("nin shared_norm='false'", lambda: NiNBlock(4, 8, 4, 8, shared_norm="false", backend=T), TypeError,
     r"shared_norm must be true or false"),
    ("mlp bias='false'", lambda: Mlp(8, 16, bias="false"), TypeError, r"bias must be true or false"),
    ("glu bias='false'", lambda: GLUFeedForward(8, 16, bias="false", backend=T), TypeError, r"bias"),
    ("glu expanded='yes'", lambda: GLUFeedForward(8, 16, expanded="yes", backend=T), TypeError, r"expanded"),
    ("gated act expanded='false'", lambda: GatedAct("silu", expanded="false", backend=T), TypeError,
     r"expanded"),
    ("attention bias='false'", lambda: SoftmaxAttention(8, 2, bias="false"), TypeError, r"bias"),
    ("rela bias=1", lambda: ReLAAttention(8, 2, bias=1, backend=T), TypeError, r"bias"),
    ("kan bias='false'", lambda: KANLayer(4, 4, bias="false"), TypeError, r"bias"),
    ("topk noisy='false'", lambda: TopKRouter(8, 4, noisy="false"), TypeError, r"noisy"),
    ("topk selection_bias='no'", lambda: TopKRouter(8, 4, selection_bias="no"), TypeError, r"selection_bias"),
    ("gumbel hard='false'", lambda: GumbelSoftmaxRouter(8, 4, hard="false"), TypeError, r"hard"),
    ("moe bias='false'", lambda: MoEFeedForward(8, 8, num_experts=2, bias="false", backend=T), TypeError,
     r"bias"),
    ("mole freeze_base='false'", lambda: MoLELinear(8, 8, freeze_base="false", backend=T), TypeError,
     r"freeze_base"),
    ("mole bias='no'", lambda: MoLELinear(8, 8, bias="no", backend=T), TypeError, r"bias"),
    ("pregated stack residual='no'", lambda: moe_stack(residual="no"), TypeError, r"residual"),
    ("vit qkv_bias='false'", lambda: vit(qkv_bias="false"), TypeError, r"qkv_bias must be true or false"),
    ("vit qkv_bias=0", lambda: vit(qkv_bias=0), TypeError, r"qkv_bias"),
    ("vit_rela qkv_bias='False'", lambda: vit("vit_tiny_rela", qkv_bias="False"), TypeError, r"qkv_bias"),
    ("ninformer head_norm='false'", lambda: nin(head_norm="false"), TypeError, r"head_norm"),
    ("ninformer shared_norm=1", lambda: nin(shared_norm=1), TypeError, r"shared_norm"),
    ("vit_moe pregated='yes'", lambda: model_config("vit_tiny_moe", pregated="yes"), TypeError, r"pregated"),
    ("mt bias='false'", lambda: mt(bias="false"), TypeError, r"bias must be true or false"),
    ("mt_moe pregated='no'", lambda: model_config("transformer_mt_tiny_moe", vocab_size=16, pregated="no"),
     TypeError, r"pregated"),
    # dropout outside [0, 1)
    ("mixer drop=1.0", lambda: MixerBlock(4, 8, 4, 8, drop=1.0, backend=T), ValueError, r"drop must be in \[0, 1\)"),
    ("token mixing drop=-0.1", lambda: TokenMixing(4, 8, 4, drop=-0.1, backend=T), ValueError, r"drop"),
    ("nin drop=2", lambda: NiNBlock(4, 8, 4, 8, drop=2, backend=T), ValueError, r"drop"),
    ("mlp drop=1.5", lambda: Mlp(8, drop=1.5), ValueError, r"drop"),
    ("mlp drop='0.1'", lambda: Mlp(8, drop="0.1"), TypeError, r"drop"),
    ("glu drop=1.0", lambda: GLUFeedForward(8, drop=1.0, backend=T), ValueError, r"drop"),
    ("attention dropout=1.0", lambda: SoftmaxAttention(8, 2, dropout=1.0), ValueError, r"dropout"),
    ("attention dropout=nan", lambda: ReLAAttention(8, 2, dropout=float("nan"), backend=T), ValueError,
     r"dropout"),
    ("moe drop=1.0", lambda: MoEFeedForward(8, 8, num_experts=2, drop=1.0, backend=T), ValueError, r"drop"),
    ("vit drop='0.1'", lambda: vit(drop="0.1"), TypeError, r"drop"),
    ("vit drop=1.0", lambda: vit(drop=1.0), ValueError, r"drop"),
    ("mt dropout='0.1'", lambda: mt(dropout="0.1"), TypeError, r"dropout"),
    ("mt dropout=-0.5", lambda: mt(dropout=-0.5), ValueError, r"dropout"),
    # eps and other positive numbers
    ("rms eps=0", lambda: RMSNorm(8, eps=0.0, backend=T), ValueError, r"eps must be a finite number > 0"),
    ("rms eps=-1e-6", lambda: RMSNorm(8, eps=-1e-6, backend=T), ValueError, r"eps"),
    ("rms eps='1e-6'", lambda: RMSNorm(8, eps="1e-6", backend=T), TypeError, r"eps"),
    ("rms eps=nan", lambda: RMSNorm(8, eps=float("nan"), backend=T), ValueError, r"eps"),
    ("gated rms eps=0", lambda: GatedRMSNorm(8, eps=0, backend=T), ValueError, r"eps"),
    ("gated rms eps=inf", lambda: GatedRMSNorm(8, eps=float("inf"), backend=T), ValueError, r"eps"),
    ("grkan eps=0", lambda: GRKAN(4, eps=0.0), ValueError, r"eps"),
    ("grkan eps='1e-5'", lambda: GRKAN(4, eps="1e-5"), TypeError, r"eps"),
    ("kan scale_noise='0.1'", lambda: KANLayer(4, 4, scale_noise="0.1"), TypeError, r"scale_noise"),
    ("mole alpha='16'", lambda: MoLELinear(8, 8, alpha="16", backend=T), TypeError, r"alpha"),
    ("moe capacity_factor='1.25'", lambda: MoEFeedForward(8, 8, num_experts=2, capacity_factor="1.25", backend=T),
     TypeError, r"capacity_factor"),
    ("vit norm_eps=0", lambda: vit(norm_eps=0.0), ValueError, r"norm_eps"),
    ("vit norm_eps='1e-6'", lambda: vit(norm_eps="1e-6"), TypeError, r"norm_eps"),
    ("mt norm_eps='1e-5'", lambda: mt(norm_eps="1e-5"), TypeError, r"norm_eps"),
    ("mt norm_eps=inf", lambda: mt(norm_eps=float("inf")), ValueError, r"norm_eps"),
    ("mt norm_position='mid'", lambda: mt(norm_position="mid"), ValueError, r"norm_position must be one of"),
    ("mt norm_position=True", lambda: mt(norm_position=True), TypeError, r"norm_position"),
    ("vit mlp_ratio=nan", lambda: vit(mlp_ratio=float("nan")), ValueError, r"mlp_ratio"),
    ("vit mlp_ratio=inf", lambda: vit(mlp_ratio=float("inf")), ValueError, r"mlp_ratio"),
    ("vit mlp_ratio='4'", lambda: vit(mlp_ratio="4"), TypeError, r"mlp_ratio"),
    # other names, kinds and configs of the wrong type
    ("vit dim=8.0", lambda: create_model("vit_tiny", dim=8.0), TypeError, r"dim must be a positive int"),
    ("vit heads='2'", lambda: vit(heads="2"), TypeError, r"heads"),
    ("vit depth=-1", lambda: vit(depth=-1), ValueError, r"depth"),
    ("vit attention=['rela']", lambda: vit(attention=["rela"]), TypeError, r"attention"),
    ("vit ffn=None", lambda: vit(ffn=None), TypeError, r"ffn"),
    ("mixer channels_hidden=0 (config)", lambda: mixer(channels_hidden=0), ValueError, r"channels_hidden"),
    ("mixer channels_hidden=2.5 (config)", lambda: mixer(channels_hidden=2.5), TypeError, r"channels_hidden"),
    ("mt vocab_size=16.0", lambda: mt(vocab_size=16.0), TypeError, r"vocab_size"),
    ("mt max_len=0", lambda: mt(max_len=0), ValueError, r"max_len"),
    ("mt attention=None", lambda: mt(attention=None), TypeError, r"attention"),
    ("mt cross_attention='linear'", lambda: mt(cross_attention="linear"), ValueError,
     r"cross_attention must be one of \('softmax', 'rela'\), got 'linear'"),
    ("mt encoder_attention=1", lambda: mt(encoder_attention=1), TypeError, r"encoder_attention"),
    ("vit_moe num_experts=2.0", lambda: model_config("vit_tiny_moe", num_experts=2.0), TypeError, r"num_experts"),
    ("vit_moe moe_k=1.0", lambda: model_config("vit_tiny_moe", moe_k=1.0), TypeError, r"moe_k"),
    ("vit_moe router_args=list", lambda: model_config("vit_tiny_moe", router_args=[("noisy", True)]), TypeError,
     r"router_args"),
    ("vit_moe balance_coef='0.01'", lambda: model_config("vit_tiny_moe", balance_coef="0.01"), TypeError,
     r"balance_coef"),
    ("vit_moe capacity_factor=0", lambda: model_config("vit_tiny_moe", capacity_factor=0), ValueError,
     r"capacity_factor"),
    ("vit_moe capacity_factor='1'", lambda: model_config("vit_tiny_moe", capacity_factor="1"), TypeError,
     r"capacity_factor"),
    ("create_model(['vit_tiny'])", lambda: create_model(["vit_tiny"]), TypeError, r"name"),
    ("VisionTransformer(dict)", lambda: VisionTransformer({"dim": 8}), TypeError, r"cfg"),
    ("EncoderDecoder(dict)", lambda: EncoderDecoder({"vocab_size": 16}), TypeError, r"cfg"),
    ("gated act kind=['silu']", lambda: GatedAct(["silu"], backend=T), TypeError, r"kind"),
    ("glu order=True", lambda: GLUFeedForward(8, kind="xswiglu", order=True, backend=T), TypeError, r"order"),
    ("glu norm_layer='layer'", lambda: GLUFeedForward(8, norm_layer="layer", backend=T), TypeError,
     r"norm_layer"),
    ("mlp act_layer=3", lambda: Mlp(8, act_layer=3), TypeError, r"act_layer"),
    ("nin ffn='mlp'", lambda: NiNBlock(4, 8, 4, 8, ffn="mlp", backend=T), TypeError, r"ffn"),
    ("rela norm=['rms']", lambda: ReLAAttention(8, 2, norm=["rms"], backend=T), TypeError, r"norm"),
    ("rela backend='cuda'", lambda: ReLAAttention(8, 2, backend="cuda"), ValueError, r"backend must be one of"),
    ("rms backend=None", lambda: RMSNorm(8, backend=None), ValueError, r"backend"),
    ("token mixing backend='gpu'", lambda: TokenMixing(4, 8, 4, backend="gpu"), ValueError, r"backend"),
    ("glu backend='fast'", lambda: GLUFeedForward(8, backend="fast"), ValueError, r"backend"),
    ("gated act backend='gpu'", lambda: GatedAct("silu", backend="gpu"), ValueError, r"backend"),
    ("topk backend='cuda'", lambda: TopKRouter(8, 4, backend="cuda"), ValueError, r"backend"),
    ("glu order='2'", lambda: GLUFeedForward(8, kind="silu", order="2", backend=T), TypeError, r"order"),
    ("moe router_args=list", lambda: MoEFeedForward(8, 8, num_experts=2, router_args=[("noisy", True)], backend=T),
     TypeError, r"router_args"),
    ("link_pregated record_events='yes'",
     lambda: link_pregated([MoEFeedForward(8, 8, num_experts=2, backend=T)], record_events="yes"), TypeError,
     r"record_events"),
    ("vit_moe moe_expert=3", lambda: model_config("vit_tiny_moe", moe_expert=3), TypeError, r"moe_expert"),
    ("PatchEmbed img_size=28 patch_size=5", lambda: PatchEmbed(28, 5, 1, 8), ValueError, r"patch_size"),
    ("PatchEmbed in_chans=1.0", lambda: PatchEmbed(28, 4, 1.0, 8), TypeError, r"in_chans"),
    ("ViTBlock(dict)", lambda: ViTBlock({"dim": 8}), TypeError, r"cfg must be a ViTConfig"),
    ("sinusoidal_positions dim=8.0", lambda: sinusoidal_positions(4, 8.0), TypeError, r"dim"),
]


# --- foreign errors: mistakes at forward time ------------------------------------------------------

FOREIGN = [
    # wrong width into attention / feed-forward / norm / mixing blocks
    ("softmax attention width 6 != 8", lambda: SoftmaxAttention(8, 2)(x3(d=6)), ValueError,
     r"x must have shape \(batch, seq, dim\) with dim=8"),
    ("rela attention width 6 != 8", lambda: ReLAAttention(8, 2, backend=T)(x3(d=6)), ValueError, r"x .*dim=8"),
    ("attention context width", lambda: SoftmaxAttention(8, 2)(x3(), context=x3(2, 4, 6)), ValueError,
     r"context must have shape"),
    ("glu width", lambda: GLUFeedForward(8, 16, backend=T)(torch.randn(2, 6)), ValueError,
     r"x must have 8 features in its last dimension \(in_features=8\)"),
    ("mlp width", lambda: Mlp(8, 16)(torch.randn(2, 6)), ValueError, r"x must have 8 features"),
    ("rms width", lambda: RMSNorm(8, backend=T)(torch.randn(2, 6)), ValueError, r"x must have 8 features"),
    ("gated rms width", lambda: GatedRMSNorm(8, backend=T)(torch.randn(2, 6)), ValueError, r"x must have 8"),
    ("token mixing width", lambda: TokenMixing(4, 8, 4, backend=T)(x3(2, 4, 6)), ValueError,
     r"input must have 8 channels"),
    ("token mixing gate shape", lambda: TokenMixing(4, 8, 4, backend=T)(x3(2, 4, 8), gate=x3(2, 4, 4)),
     ValueError, r"gate must have"),
    ("mixer block width", lambda: MixerBlock(4, 8, 4, 8, backend=T)(x3(2, 4, 6)), ValueError, r"input must have 8"),
    ("nin block width", lambda: NiNBlock(4, 8, 4, 8, backend=T)(x3(2, 4, 6)), ValueError, r"input must have 8"),
    ("nin block tokens", lambda: NiNBlock(4, 8, 4, 8, backend=T)(x3(2, 5, 8)), ValueError,
     r"input must have shape \(batch, 4 tokens, dim\)"),
    # wrong dtypes into blocks
    ("attention int input", lambda: SoftmaxAttention(8, 2)(torch.ones(2, 3, 8, dtype=torch.long)), TypeError,
     r"x must be a floating-point tensor"),
    ("attention float64 input", lambda: SoftmaxAttention(8, 2)(x3(dtype=torch.float64)), TypeError,
     r"x has dtype torch.float64"),
    ("attention list input", lambda: SoftmaxAttention(8, 2)([[0.0] * 8]), TypeError, r"x must be a torch.Tensor"),
    ("mlp int input", lambda: Mlp(8, 16)(torch.ones(2, 8, dtype=torch.long)), TypeError, r"x must be a floating"),
    ("glu float64 input", lambda: GLUFeedForward(8, 16, backend=T)(torch.randn(2, 8, dtype=torch.float64)),
     TypeError, r"x has dtype"),
    ("token mixing uint8", lambda: TokenMixing(4, 8, 4, backend=T)(torch.zeros(2, 4, 8, dtype=torch.uint8)),
     TypeError, r"input must be a floating"),
    # attention arguments
    ("attention causal='false'", lambda: SoftmaxAttention(8, 2)(x3(), causal="false"), TypeError,
     r"causal must be true or false"),
    ("rela causal=1", lambda: ReLAAttention(8, 2, backend=T)(x3(), causal=1), TypeError, r"causal"),
    ("attention cache=dict", lambda: SoftmaxAttention(8, 2)(x3(), cache={}), TypeError, r"cache must be a KVCache"),
    ("softmax context of 0 tokens", lambda: SoftmaxAttention(8, 2)(x3(), context=x3(2, 0)), ValueError,
     r"context must hold at least one token"),
    ("rela context of 0 tokens", lambda: ReLAAttention(8, 2, backend=T)(x3(), context=x3(2, 0)), ValueError,
     r"context"),
    # a KVCache reused with another batch size (or reordered out of range)
    ("softmax KVCache other batch", lambda: kv_batch_change(SoftmaxAttention(8, 2)), ValueError,
     r"cache holds .*batch size 2.* 3"),
    ("rela KVCache other batch", lambda: kv_batch_change(ReLAAttention(8, 2, backend=T)), ValueError,
     r"cache .*batch size"),
    ("cross KVCache other batch", lambda: cross_batch_change(SoftmaxAttention(8, 2)), ValueError,
     r"cache .*batch size"),
    ("KVCache other layer shape",
     lambda: (lambda c: twice(lambda: SoftmaxAttention(8, 2)(x3(2, 1), cache=c),
                              lambda: SoftmaxAttention(8, 4)(x3(2, 1), cache=c)))(KVCache()),
     ValueError, r"cache holds .*heads"),
    ("KVCache.reorder out of range", lambda: reorder(torch.tensor([0, 2])), ValueError, r"index .*\[0, 2\)"),
    ("KVCache.reorder float index", lambda: reorder(torch.tensor([0.0, 1.0])), TypeError, r"index"),
    # images into the image models: integers instead of normalised floats, other dtypes, not tensors
    ("vit uint8 images", lambda: vit()(images(dtype=torch.uint8)), TypeError,
     r"images must be a floating-point tensor"),
    ("mixer uint8 images", lambda: mixer()(images(dtype=torch.uint8)), TypeError, r"images .*normalised"),
    ("ninformer uint8 images", lambda: nin()(images(dtype=torch.uint8)), TypeError, r"images .*float"),
    ("vit int64 images", lambda: vit("vit_tiny_rela")(images(dtype=torch.long)), TypeError, r"images"),
    ("vit float64 images", lambda: vit()(images(dtype=torch.float64)), TypeError, r"images has dtype torch.float64"),
    ("vit numpy images", lambda: vit()(np.zeros((2, 1, 8, 8), np.float32)), TypeError,
     r"images must be a torch.Tensor"),
    ("vit wrong image size", lambda: vit()(torch.rand(2, 1, 9, 9)), ValueError, r"images must have shape"),
    ("mixer block list input", lambda: MixerBlock(4, 8, 4, 8, backend=T)([[0.0] * 8] * 4), TypeError,
     r"input must be a torch.Tensor"),
    ("kan int input", lambda: KANLayer(4, 4)(torch.ones(2, 4, dtype=torch.long)), TypeError, r"x must be a floating"),
    ("moe numpy input", lambda: MoEFeedForward(8, 8, num_experts=2, backend=T)(np.zeros((2, 8), np.float32)),
     TypeError, r"x must be a torch.Tensor"),
    ("KVCache.reorder 2-D index", lambda: reorder(torch.tensor([[0, 1]])), ValueError, r"index must be a 1-D"),
    # the translation model: dtypes, ranges, batch sizes of src and tgt_in, decoding state
    ("mt float src", lambda: mt()(ids().float(), ids()), TypeError, r"src must be .*integer"),
    ("mt float tgt_in", lambda: mt()(ids(), ids().float()), TypeError, r"tgt_in"),
    ("mt bool src", lambda: mt()(ids() > 5, ids()), TypeError, r"src"),
    ("mt src ids >= vocab_size", lambda: mt()(torch.full((2, 3), 16), ids()), ValueError,
     r"src holds ids outside \[0, vocab_size=16\)"),
    ("mt negative tgt_in ids", lambda: mt()(ids(), torch.full((2, 3), -1)), ValueError, r"tgt_in holds ids"),
    ("mt 1-D src", lambda: mt()(torch.tensor([4, 5, 6]), ids()), ValueError, r"src must be a \(batch, length\)"),
    ("mt src/tgt_in batch mismatch", lambda: mt()(ids(2), ids(3)), ValueError,
     r"tgt_in has batch size 3 but src has 2"),
    ("mt decode memory=tensor", lambda: mt().decode(ids(), torch.randn(2, 3, 8)), TypeError,
     r"memory must be a Memory"),
    ("mt decode_step float tokens",
     lambda: (lambda m: m.decode_step(torch.full((2, 1), 2.0), m.encode(ids())))(mt()), TypeError, r"tokens"),
    ("mt decode_step tokens >= vocab_size",
     lambda: (lambda m: m.decode_step(torch.full((2, 1), 99), m.encode(ids())))(mt()), ValueError,
     r"tokens holds ids outside"),
    ("mt decode_step batch mismatch",
     lambda: (lambda m: m.decode_step(torch.full((3, 1), 2), m.encode(ids(2))))(mt()), ValueError,
     r"tokens has batch size 3 but memory holds 2"),
    ("mt decode_step cache of another batch", decode_step_with_other_batch, ValueError, r"cache .*batch size"),
    ("mt decode_step cache=dict",
     lambda: (lambda m: m.decode_step(torch.full((2, 1), 2), m.encode(ids()), {}))(mt()), TypeError,
     r"cache must be a DecoderCache"),
    ("mt Memory.select out of range", lambda: mt().encode(ids(2)).select(torch.tensor([0, 5])), ValueError,
     r"index"),
    ("mt Memory.select float index", lambda: mt().encode(ids(2)).select(torch.tensor([0.0])), TypeError, r"index"),
    ("mt decode_step 1-D tokens",
     lambda: (lambda m: m.decode_step(torch.full((2,), 2), m.encode(ids())))(mt()), ValueError,
     r"tokens must be a \(batch, length\)"),
    ("mt DecoderCache.reorder out of range",
     lambda: (lambda m: m.decode_step(torch.full((2, 1), 2), m.encode(ids()))[1].reorder(torch.tensor([3])))(mt()),
     ValueError, r"index"),
]


# --- empty batches: an empty output of the right shape ---------------------------------------------

EMPTY = [
    ("softmax attention batch 0", lambda: SoftmaxAttention(8, 2)(x3(0, 3)), (0, 3, 8)),
    ("softmax attention 0 tokens", lambda: SoftmaxAttention(8, 2)(x3(2, 0)), (2, 0, 8)),
    ("softmax cross-attention batch 0", lambda: SoftmaxAttention(8, 2)(x3(0, 3), context=x3(0, 4)), (0, 3, 8)),
    ("softmax causal batch 0 with mask",
     lambda: SoftmaxAttention(8, 2)(x3(0, 3), key_padding_mask=torch.ones(0, 3, dtype=torch.bool), causal=True),
     (0, 3, 8)),
    ("rela attention batch 0", lambda: ReLAAttention(8, 2, backend=T)(x3(0, 3)), (0, 3, 8)),
    ("rela attention 0 tokens", lambda: ReLAAttention(8, 2, backend=T)(x3(2, 0)), (2, 0, 8)),
    ("rela attention batch 0 on triton", lambda: ReLAAttention(8, 2, backend="triton")(x3(0, 3)), (0, 3, 8)),
    ("gqa attention 0 tokens", lambda: SoftmaxAttention(8, 4, kv_heads=2)(x3(2, 0)), (2, 0, 8)),
    ("cached attention batch 0", lambda: SoftmaxAttention(8, 2)(x3(0, 1), cache=KVCache(), causal=True), (0, 1, 8)),
    ("glu batch 0", lambda: GLUFeedForward(8, 16, backend=T)(torch.randn(0, 8)), (0, 8)),
    ("mlp batch 0", lambda: Mlp(8, 16)(torch.randn(0, 3, 8)), (0, 3, 8)),
    ("rms batch 0", lambda: RMSNorm(8, backend=T)(torch.randn(0, 8)), (0, 8)),
    ("token mixing batch 0", lambda: TokenMixing(4, 8, 4, backend=T)(x3(0, 4)), (0, 4, 8)),
    ("nin block batch 0", lambda: NiNBlock(4, 8, 4, 8, backend=T)(x3(0, 4)), (0, 4, 8)),
    ("vit batch 0", lambda: vit()(images(0)), (0, 10)),
    ("vit_rela batch 0", lambda: vit("vit_tiny_rela")(images(0)), (0, 10)),
    ("mixer batch 0", lambda: mixer()(images(0)), (0, 10)),
    ("ninformer batch 0", lambda: nin()(images(0)), (0, 10)),
    ("mt batch 0", lambda: mt()(ids(0, 3), ids(0, 4)), (0, 4, 16)),
    ("mt_rela batch 0", lambda: mt(attention="rela")(ids(0, 3), ids(0, 2)), (0, 2, 16)),
    ("mt decode_step batch 0",
     lambda: (lambda m: m.decode_step(torch.full((0, 1), 2), m.encode(ids(0, 3)))[0])(mt()), (0, 16)),
    ("kan batch 0", lambda: KANLayer(4, 4)(torch.randn(0, 4)), (0, 4)),
    ("moe batch 0", lambda: MoEFeedForward(8, 8, num_experts=2, backend=T)(x3(0, 3)), (0, 3, 8)),
    ("mixer block batch 0", lambda: MixerBlock(4, 8, 4, 8, backend=T)(x3(0, 4)), (0, 4, 8)),
]


# --- data files and the data helpers ---------------------------------------------------------------


def _image_folder(root, test_images: bool = True, test_classes: bool = True):
    from PIL import Image

    for split in ("train", "test"):
        for c in ("cat", "dog"):
            if split == "test" and not test_classes:
                (root / split).mkdir(parents=True, exist_ok=True)
                continue
            (root / split / c).mkdir(parents=True, exist_ok=True)
            if split == "test" and not test_images:
                continue
            for k in range(2):
                Image.fromarray(np.full((4, 4), 40 * k, np.uint8)).save(root / split / c / f"{k}.png")
    return root


def _npz(path, **arrays):
    rng = np.random.default_rng(0)
    base = {"x": rng.integers(0, 255, (12, 4, 4), dtype=np.uint8), "y": np.arange(12) % 3,
            "x_test": rng.integers(0, 255, (6, 4, 4), dtype=np.uint8), "y_test": np.arange(6) % 3}
    np.savez(path, **{k: v for k, v in {**base, **arrays}.items() if v is not None})
    return path


def _truncated_npz(path, tiny_npz):
    raw = tiny_npz.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


def _bad_member_npz(path, tiny_npz):
    """A zip whose central directory is intact but whose 'x.npy' member is cut short."""
    with zipfile.ZipFile(tiny_npz) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            dst.writestr(info.filename, data[:40] if info.filename == "x.npy" else data)
    return path


def _idx_dir(root, test_labels):
    rng = np.random.default_rng(0)
    root.mkdir()
    write_idx(root / "train-images-idx3-ubyte", rng.integers(0, 255, (6, 4, 4), dtype=np.uint8))
    write_idx(root / "train-labels-idx1-ubyte", (np.arange(6) % 3).astype(np.int32))
    write_idx(root / "t10k-images-idx3-ubyte", rng.integers(0, 255, (len(test_labels), 4, 4), dtype=np.uint8))
    write_idx(root / "t10k-labels-idx1-ubyte", np.asarray(test_labels, np.int32))
    return root


# (id, make(tmp, tiny_npz) -> path, call(path), exception, regex given the path; None: the path itself)
DATA_FILES = [
    ("image folder with an empty test/ class", lambda d, _: _image_folder(d / "f", test_images=False),
     load_dataset, DataFormatError, lambda p: re.escape(str(p / "test")) + r": no images"),
    ("image folder with an empty test/", lambda d, _: _image_folder(d / "f", test_classes=False),
     load_dataset, DataFormatError, lambda p: re.escape(str(p / "test")) + r": no images"),
    ("npz label 10**9", lambda d, _: _npz(d / "big.npz", y=np.r_[np.arange(11) % 3, 10**9]), load_dataset,
     DataFormatError, lambda p: re.escape(str(p)) + r":y: label 1000000000 .*out of range"),
    ("npz test label 10**6", lambda d, _: _npz(d / "bigt.npz", y_test=np.r_[np.arange(5) % 3, 10**6]),
     load_dataset, DataFormatError, lambda p: re.escape(str(p)) + r":y_test: label 1000000 "),
    ("npz negative label", lambda d, _: _npz(d / "neg.npz", y=np.r_[np.arange(11) % 3, -3]), load_dataset,
     DataFormatError, lambda p: re.escape(str(p)) + r":y: .*label -3"),
    ("npz label 10**9 without a test split",
     lambda d, _: _npz(d / "bigh.npz", y=np.r_[np.arange(11) % 3, 10**9], x_test=None, y_test=None),
     load_dataset, DataFormatError, lambda p: re.escape(str(p)) + r":y: label 1000000000"),
    ("npz truncated file", lambda d, t: _truncated_npz(d / "cut.npz", t), load_dataset, DataFormatError,
     lambda p: re.escape(str(p))),
    ("npz with a cut member", lambda d, t: _bad_member_npz(d / "member.npz", t), load_dataset, DataFormatError,
     lambda p: re.escape(str(p))),
    ("npz object array", lambda d, _: _npz(d / "obj.npz", x=np.array([None] * 12, dtype=object)), load_dataset,
     DataFormatError, lambda p: re.escape(str(p))),
    ("npz empty test split", lambda d, _: _npz(d / "notest.npz", x_test=np.zeros((0, 4, 4), np.uint8),
                                               y_test=np.zeros(0, int)),
     load_dataset, DataFormatError, lambda p: re.escape(str(p)) + r".*test split is empty"),
    ("idx label 10**9", lambda d, _: _idx_dir(d / "idx", [0, 1, 10**9]), load_dataset, DataFormatError,
     lambda p: re.escape(str(p / "t10k-labels-idx1-ubyte")) + r": label 1000000000"),
    ("idx empty test split", lambda d, _: _idx_dir(d / "idx0", []), load_dataset, DataFormatError,
     lambda p: re.escape(str(p)) + r".*test split is empty"),
]

# the data and text helpers: (id, call, exception, regex)
DATA_HELPERS = [
    ("load_dataset(123)", lambda: load_dataset(123), TypeError, r"data must be"),
    ("Batches batch_size=True", lambda: batches(batch_size=True), TypeError, r"batch_size"),
    ("Batches batch_size=2.0", lambda: batches(batch_size=2.0), TypeError, r"batch_size"),
    ("Batches shuffle='false'", lambda: batches(shuffle="false"), TypeError, r"shuffle must be true or false"),
    ("Batches augment='no'", lambda: batches(augment="no"), TypeError, r"augment"),
    ("Batches drop_last=1", lambda: batches(drop_last=1), TypeError, r"drop_last"),
    ("Batches std=nan", lambda: batches(std=[float("nan")]), ValueError, r"std"),
    ("Batches mean=inf", lambda: batches(mean=[float("inf")]), ValueError, r"mean"),
    ("Batches float labels", lambda: batches(labels=torch.zeros(4)), TypeError, r"labels"),
    ("Batches numpy images", lambda: batches(images=np.zeros((4, 1, 2, 2), np.uint8)), TypeError, r"images"),
    ("Batches float images", lambda: batches(images=torch.zeros(4, 1, 2, 2)), TypeError, r"images must be a uint8"),
    ("Batches seed='0'", lambda: batches(seed="0"), TypeError, r"seed"),
    ("Batches shift=True", lambda: batches(shift=True), TypeError, r"shift"),
    ("Batches.epoch start=-1", lambda: list(batches().epoch(0, start=-1)), ValueError, r"start"),
    ("Batches.epoch start=5", lambda: list(batches().epoch(0, start=5)), ValueError, r"start"),
    ("holdout_split fraction=1.5", lambda: holdout_split(10, fraction=1.5), ValueError, r"fraction"),
    ("holdout_split n=10.0", lambda: holdout_split(10.0), TypeError, r"\bn\b"),
    ("read_lines(None)", lambda: text.read_lines(None), TypeError, r"path"),
    ("read_lines allow_empty='yes'", lambda: text.read_lines(__file__, allow_empty="yes"), TypeError,
     r"allow_empty"),
    ("split_pairs dev=1.0", lambda: text.split_pairs([("a", "b")] * 5, dev=1.0), TypeError, r"dev"),
    ("collate str id", lambda: text.collate([[4, "a"]], [[4]]), TypeError, r"src_ids\[0\]"),
    ("collate float id", lambda: text.collate([[4]], [[4.5]]), TypeError, r"tgt_ids\[0\]"),
    ("collate negative id", lambda: text.collate([[4, -1]], [[4]]), ValueError, r"src_ids\[0\]"),
    ("TokenBatches shuffle='no'", lambda: text.TokenBatches([[4]], [[5]], shuffle="no"), TypeError, r"shuffle"),
    ("TokenBatches seed=1.5", lambda: text.TokenBatches([[4]], [[5]], seed=1.5), TypeError, r"seed"),
    ("TokenBatches float id", lambda: text.TokenBatches([[4.0]], [[5]]), TypeError, r"src_ids\[0\]"),
    ("read_parallel(None, ...)", lambda: text.read_parallel(None, __file__), TypeError, r"src_path"),
    ("TokenBatches.epoch start=1.0", lambda: list(text.TokenBatches([[4]], [[5]]).epoch(0, start=1.0)),
     TypeError, r"start"),
    ("Tokenizer.train character_coverage='1'",
     lambda: text.Tokenizer.train(["a b"], "/nonexistent/x", character_coverage="1"), TypeError,
     r"character_coverage"),
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, corpus):
    lines = (corpus / "train.en").read_text().splitlines() + (corpus / "train.es").read_text().splitlines()
    return text.Tokenizer.train(lines, tmp_path_factory.mktemp("spm") / "tok", vocab_size=40)


# (id, call(tokenizer), exception, regex)
TOKENIZER = [
    ("decode float tensor", lambda tok: tok.decode(torch.tensor([4.7, 5.2])), TypeError, r"ids"),
    ("decode float list", lambda tok: tok.decode([4.7, 5.2]), TypeError, r"ids"),
    ("decode 3-D tensor", lambda tok: tok.decode(torch.ones(1, 1, 2, dtype=torch.long)), ValueError, r"ids"),
    ("encode non-str", lambda tok: tok.encode(["the king", 3]), TypeError, r"texts\[1\]"),
    ("encode_pieces non-str", lambda tok: tok.encode_pieces([None]), TypeError, r"texts\[0\]"),
]


# --- the tests -------------------------------------------------------------------------------------


def _ids(table):
    return [row[0] for row in table]


def _check(call, exc, pattern):
    with pytest.raises(exc) as info:
        call()
    assert re.search(pattern, str(info.value)), f"message {str(info.value)!r} does not match {pattern!r}"


@pytest.mark.parametrize("name, call, exc, pattern", SILENT, ids=_ids(SILENT))
def test_silent_acceptance(name, call, exc, pattern):
    _check(call, exc, pattern)


@pytest.mark.parametrize("name, call, exc, pattern", FOREIGN, ids=_ids(FOREIGN))
def test_foreign_errors(name, call, exc, pattern):
    _check(call, exc, pattern)


@pytest.mark.parametrize("name, call, shape", EMPTY, ids=_ids(EMPTY))
def test_empty_batches_give_empty_outputs(name, call, shape):
    with torch.no_grad():
        out = call()
    assert tuple(out.shape) == shape


@pytest.mark.parametrize("name, make, call, exc, pattern", DATA_FILES, ids=_ids(DATA_FILES))
def test_bad_data_files(name, make, call, exc, pattern, tmp_path, tiny_npz):
    path = make(tmp_path, tiny_npz)
    _check(lambda: call(path), exc, pattern(path))


@pytest.mark.parametrize("name, call, exc, pattern", DATA_HELPERS, ids=_ids(DATA_HELPERS))
def test_bad_data_arguments(name, call, exc, pattern):
    _check(call, exc, pattern)


@pytest.mark.parametrize("name, call, exc, pattern", TOKENIZER, ids=_ids(TOKENIZER))
def test_bad_tokenizer_input(name, call, exc, pattern, tokenizer):
    _check(lambda: call(tokenizer), exc, pattern)


BAD_INPUTS = [*SILENT, *FOREIGN, *EMPTY, *DATA_FILES, *DATA_HELPERS, *TOKENIZER]
"""Every bad input these tests try (one entry per parametrised case)."""
