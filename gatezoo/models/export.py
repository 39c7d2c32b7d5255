"""Export a softmax :class:`~gatezoo.models.EncoderDecoder` to a CTranslate2 model directory.

:func:`export_ctranslate2` fills a CTranslate2 ``TransformerSpec`` (pre-norm encoder and decoder
stacks with a final LayerNorm each, or post-norm stacks for ``norm_position="post"``) from the
model's tensors and saves it (``model.bin``, ``config.json``, ``shared_vocabulary.json``), so that
``ctranslate2.Translator`` runs the model on CPU or GPU with its own search. The mapping:

======================================  =====================================================
gatezoo                                 CTranslate2 spec
======================================  =====================================================
``embed.weight``                        ``encoder.embeddings``, ``decoder.embeddings`` and
                                        ``decoder.projection`` (tied; no output bias), with
                                        ``scale_embeddings`` (times sqrt(dim))
``src_embed.weight`` (only with         ``encoder.embeddings`` instead (the decoder's two
``tie_source_embedding=False``)         stay ``embed.weight``)
``positions`` (sines, then cosines)     ``position_encodings.encodings`` of both stacks,
                                        written explicitly so no layout convention can differ
``encoder[i].norm1`` / ``norm2``        ``encoder.layer[i].self_attention.layer_norm`` /
                                        ``ffn.layer_norm``
``decoder[i].norm1`` / ``norm2`` /      ``decoder.layer[i].self_attention.layer_norm`` /
``norm3``                               ``attention.layer_norm`` / ``ffn.layer_norm``
self-attention ``q``, ``kv`` = [k; v]   ``self_attention.linear[0]`` = [q; k; v] (one fused
                                        linear), ``proj`` -> ``linear[1]``
cross-attention ``q``, ``kv``,          ``attention.linear[0]`` (query), ``linear[1]``
``proj``                                (fused [k; v], applied to the encoder output),
                                        ``linear[2]`` (output)
``Mlp`` ``fc1``, ``fc2``                ``ffn.linear_0``, ``ffn.linear_1``
``GLUFeedForward`` ``fc1`` = [a | b]    ``ffn.linear_0`` = a rows (activated),
                                        ``ffn.linear_0_noact`` = b rows, ``fc2`` ->
                                        ``linear_1``; ``ffn_glu=True``
``enc_norm`` / ``dec_norm``             ``encoder.layer_norm`` / ``decoder.layer_norm``
                                        (pre-norm only)
``config.norm_eps``                     ``config.json`` ``layer_norm_epsilon``
======================================  =====================================================

``attn_dropout`` and ``dropout`` act in training only and have nothing to export. An untied
source embedding needs nothing special: CTranslate2 keeps the encoder's embedding apart from the
decoder's anyway (when they are equal, ``optimize`` stores one copy), and the vocabulary is
joint either way.

Biases are copied where the model has them. The activations CTranslate2 has: ``mlp-relu``
(RELU), ``mlp-gelu`` (GELU, the erf form of torch's ``nn.GELU``), ``mlp-silu`` (SWISH), and the
GLUs ``swiglu`` (SWISH gate), ``geglu`` (GELU gate), ``reglu`` (RELU gate) and ``glu`` /
``swiglu1`` (Sigmoid gate). Rectified linear attention, ATLU, the expanded x-activations and
the other GLUs (Phi-GLU, ATGLU, bilinear) have no CTranslate2 counterpart and are refused.

The vocabulary is the list of pieces in id order; the first four must be ``<pad>``, ``<unk>``,
``<s>``, ``</s>`` (gatezoo's ids 0 to 3), which the config names as CTranslate2's unknown,
start (decoder start) and end tokens. No BOS or EOS is added to the source, as in gatezoo.

>>> from gatezoo.models.export import export_ctranslate2
>>> path = export_ctranslate2(model, "out/ct2", sp_pieces)
>>> translator = ctranslate2.Translator(str(path), device="cpu")
>>> translator.translate_batch([["▁Hallo", "▁Welt"]], beam_size=1, min_decoding_length=0)

CTranslate2's ``translate_batch`` defaults differ from :mod:`gatezoo.eval.decode`: it asks for
at least one token before EOS (``min_decoding_length=1``; pass 0 to let EOS come first, as
gatezoo does), its ``max_decoding_length`` counts the generated tokens including EOS but returns
an unfinished hypothesis as it is (gatezoo forces EOS at its limit, so gatezoo's limit ``L``
matches ``max_decoding_length=L - 1``), and it does not keep ``<pad>`` and ``<s>`` from being
generated (pass ``suppress_sequences=[["<pad>"], ["<s>"]]``, which gatezoo's search always
does).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gatezoo.blocks import GLUFeedForward, Mlp, ReLAAttention, SoftmaxAttention
from gatezoo.blocks.activation import GatedAct

from .translation import BOS_ID, EOS_ID, MT_ATTENTION_PLACES, PAD_ID, EncoderDecoder

__all__ = ["SPECIAL_PIECES", "ctranslate2_available", "export_ctranslate2"]

SPECIAL_PIECES = ("<pad>", "<unk>", "<s>", "</s>")
"""The pieces of ids 0..3 (pad, unk, BOS, EOS) that an exported vocabulary must start with."""

# CTranslate2's Activation enum member for each activation it runs (its GELU is the erf form).
_MLP_ACTS = {nn.ReLU: "RELU", nn.SiLU: "SWISH"}
_GLU_GATES = {"silu": "SWISH", "gelu": "GELU", "relu": "RELU", "sigmoid": "Sigmoid"}


def ctranslate2_available() -> bool:
    """True when the ``ctranslate2`` package can be imported."""
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        return False
    return True


def _import_ctranslate2():
    try:
        import ctranslate2  # noqa: F401
        from ctranslate2.specs import common_spec, transformer_spec
    except ImportError as e:
        raise ImportError("exporting to CTranslate2 needs the ctranslate2 package: pip install ctranslate2") from e
    return common_spec, transformer_spec


def _ffn_activation(ffn: nn.Module, where: str) -> tuple[str, bool]:
    """(name of the CTranslate2 Activation member, GLU?) for one feed-forward, or ValueError."""
    if isinstance(getattr(ffn, "norm", None), nn.Module) and not isinstance(ffn.norm, nn.Identity):
        raise ValueError(f"{where}: a norm inside the feed-forward has no CTranslate2 counterpart")
    if type(ffn) is Mlp:
        act = ffn.act
        if isinstance(act, GatedAct):
            name = ("x" if act.expanded else "") + ("atlu" if act.kind == "atlu" else act.kind)
            raise ValueError(f"{where}: CTranslate2 has no {name} activation; exportable feed-forwards are "
                             f"mlp-relu, mlp-gelu, mlp-silu and the GLUs swiglu, geglu, reglu, glu")
        if type(act) is nn.GELU:
            return ("GELU" if act.approximate == "none" else "GELUTanh"), False
        if type(act) in _MLP_ACTS:
            return _MLP_ACTS[type(act)], False
        raise ValueError(f"{where}: CTranslate2 has no counterpart of the activation {type(act).__name__}")
    if type(ffn) is GLUFeedForward:
        if ffn.expanded:
            raise ValueError(f"{where}: CTranslate2 has no expanded (x-activation) GLU gate (kind {ffn.kind!r} "
                             f"with a trainable alpha)")
        if ffn.kind not in _GLU_GATES:
            raise ValueError(f"{where}: CTranslate2 has no GLU with the {ffn.kind!r} gate; exportable GLUs are "
                             f"swiglu (silu), geglu (gelu), reglu (relu) and glu (sigmoid)")
        return _GLU_GATES[ffn.kind], True
    raise ValueError(f"{where}: CTranslate2 cannot run a {type(ffn).__name__} feed-forward")


def _check_attention(attn: nn.Module, heads: int, dim: int, where: str) -> None:
    if isinstance(attn, ReLAAttention):
        raise ValueError("CTranslate2 has no rectified linear attention (ReLA); only softmax EncoderDecoder "
                         "models can be exported")
    if type(attn) is not SoftmaxAttention:
        raise ValueError(f"{where}: CTranslate2 cannot run a {type(attn).__name__} attention")
    if attn.heads != heads or attn.kv_heads != heads or attn.heads * attn.head_dim != dim:
        raise ValueError(f"{where}: expected {heads} query and key/value heads of width {dim // heads}, got "
                         f"heads={attn.heads}, kv_heads={attn.kv_heads}, head_dim={attn.head_dim}")


def _stack_activation(layers: nn.ModuleList, heads: int, dim: int, attn_names: tuple[str, ...],
                      stack: str) -> tuple[str, bool]:
    """Check every layer of a stack and return its one feed-forward activation."""
    plans = set()
    for i, layer in enumerate(layers):
        for name in attn_names:
            _check_attention(getattr(layer, name), heads, dim, f"{stack}[{i}].{name}")
        plans.add(_ffn_activation(layer.ffn, f"{stack}[{i}].ffn"))
    if len(plans) != 1:
        raise ValueError(f"{stack}: CTranslate2 needs one feed-forward kind per stack, got {sorted(plans)}")
    return plans.pop()


def _check_vocabulary(vocabulary, vocab_size: int) -> list[str]:
    if isinstance(vocabulary, str) or not all(isinstance(p, str) for p in vocabulary):
        raise ValueError("vocabulary must be a list of token strings (the SentencePiece pieces, in id order)")
    vocabulary = list(vocabulary)
    if len(vocabulary) != vocab_size:
        raise ValueError(f"vocabulary has {len(vocabulary)} pieces but the model's vocab_size is {vocab_size}")
    if tuple(vocabulary[:4]) != SPECIAL_PIECES:
        raise ValueError(f"vocabulary must start with the special pieces {list(SPECIAL_PIECES)} (ids "
                         f"{PAD_ID}, 1, {BOS_ID}, {EOS_ID}), got {vocabulary[:4]}")
    if len(set(vocabulary)) != len(vocabulary):
        seen: set[str] = set()
        dup = next(p for p in vocabulary if p in seen or seen.add(p))
        raise ValueError(f"vocabulary pieces must be unique, {dup!r} appears more than once")
    return vocabulary


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().copy()


def _set_linear(spec, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    spec.weight = _np(weight)
    if bias is not None:
        spec.bias = _np(bias)


def _set_norm(spec, norm: nn.LayerNorm) -> None:
    dim = norm.normalized_shape[-1]
    spec.gamma = _np(norm.weight) if norm.weight is not None else np.ones(dim, np.float32)
    spec.beta = _np(norm.bias) if norm.bias is not None else np.zeros(dim, np.float32)


def _cat_bias(*linears: nn.Linear) -> torch.Tensor | None:
    if all(m.bias is None for m in linears):
        return None
    return torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in linears])


def _set_self_attention(spec, attn: SoftmaxAttention, norm: nn.LayerNorm) -> None:
    _set_norm(spec.layer_norm, norm)
    _set_linear(spec.linear[0], torch.cat([attn.q.weight, attn.kv.weight]), _cat_bias(attn.q, attn.kv))
    _set_linear(spec.linear[1], attn.proj.weight, attn.proj.bias)


def _set_cross_attention(spec, attn: SoftmaxAttention, norm: nn.LayerNorm) -> None:
    _set_norm(spec.layer_norm, norm)
    _set_linear(spec.linear[0], attn.q.weight, attn.q.bias)
    _set_linear(spec.linear[1], attn.kv.weight, attn.kv.bias)
    _set_linear(spec.linear[2], attn.proj.weight, attn.proj.bias)


def _set_ffn(spec, ffn: nn.Module, norm: nn.LayerNorm) -> None:
    _set_norm(spec.layer_norm, norm)
    if isinstance(ffn, GLUFeedForward):
        h = ffn.hidden_features
        w, b = ffn.fc1.weight, ffn.fc1.bias
        _set_linear(spec.linear_0, w[:h], None if b is None else b[:h])  # a: through the gate
        _set_linear(spec.linear_0_noact, w[h:], None if b is None else b[h:])  # b: multiplied
    else:
        _set_linear(spec.linear_0, ffn.fc1.weight, ffn.fc1.bias)
    _set_linear(spec.linear_1, ffn.fc2.weight, ffn.fc2.bias)


def _check_output_dir(output_dir: Path, force: bool) -> None:
    if output_dir.exists() or output_dir.is_symlink():
        if not output_dir.is_dir():
            raise ValueError(f"output_dir {output_dir} exists and is not a directory")
        if any(output_dir.iterdir()) and not force:
            raise ValueError(f"output_dir {output_dir} exists and is not empty; pass force=True to replace it")


def _build_spec(model: EncoderDecoder, vocabulary: list[str], enc_act: tuple[str, bool], dec_act: tuple[str, bool]):
    common_spec, transformer_spec = _import_ctranslate2()
    cfg = model.config
    pre_norm = cfg.norm_position == "pre"
    encoder = transformer_spec.TransformerEncoderSpec(
        cfg.enc_layers, cfg.heads, pre_norm=pre_norm, activation=common_spec.Activation[enc_act[0]],
        ffn_glu=enc_act[1])
    decoder = transformer_spec.TransformerDecoderSpec(
        cfg.dec_layers, cfg.heads, pre_norm=pre_norm, activation=common_spec.Activation[dec_act[0]],
        ffn_glu=dec_act[1])
    spec = transformer_spec.TransformerSpec(encoder, decoder)

    embed = _np(model.embed.weight)
    positions = _np(model.positions)
    for stack in (encoder, decoder):
        stack.scale_embeddings = True
        stack.position_encodings.encodings = positions
    encoder.embeddings[0].weight = _np(model.source_embedding.weight)  # embed itself when tied
    decoder.embeddings.weight = embed
    decoder.projection.weight = embed  # tied output projection, no bias (optional in the spec)

    for layer_spec, layer in zip(encoder.layer, model.encoder):
        _set_self_attention(layer_spec.self_attention, layer.attn, layer.norm1)
        _set_ffn(layer_spec.ffn, layer.ffn, layer.norm2)
    if pre_norm:  # a post-norm stack has no final norm, in either library
        _set_norm(encoder.layer_norm, model.enc_norm)
    for layer_spec, layer in zip(decoder.layer, model.decoder):
        _set_self_attention(layer_spec.self_attention, layer.self_attn, layer.norm1)
        _set_cross_attention(layer_spec.attention, layer.cross_attn, layer.norm2)
        _set_ffn(layer_spec.ffn, layer.ffn, layer.norm3)
    if pre_norm:
        _set_norm(decoder.layer_norm, model.dec_norm)

    config = spec.config
    config.layer_norm_epsilon = float(cfg.norm_eps)
    config.unk_token = SPECIAL_PIECES[1]
    config.bos_token = config.decoder_start_token = SPECIAL_PIECES[BOS_ID]
    config.eos_token = SPECIAL_PIECES[EOS_ID]
    for name in ("add_source_bos", "add_source_eos"):
        if hasattr(config, name):
            setattr(config, name, False)
    spec.register_source_vocabulary(vocabulary)
    spec.register_target_vocabulary(vocabulary)
    spec.validate()
    spec.optimize(quantization=None)  # aliases the copies of the embedding matrix (3 when tied, else 2)
    return spec


def export_ctranslate2(model: EncoderDecoder, output_dir: str | os.PathLike, vocabulary: list[str], *,
                       force: bool = False) -> Path:
    """Write ``model`` as a CTranslate2 model directory and return its path.

    Args:
        model: a softmax-attention :class:`~gatezoo.models.EncoderDecoder` whose feed-forward
            CTranslate2 runs (``mlp-relu``, ``mlp-gelu``, ``mlp-silu``, ``swiglu``, ``geglu``,
            ``reglu``, ``glu``); see the module docstring for the mapping.
        output_dir: the directory to create; written to a temporary sibling first and renamed at
            the end, so a failure leaves nothing half-written.
        vocabulary: the token strings in id order (SentencePiece pieces), ``vocab_size`` of them,
            starting with ``<pad>``, ``<unk>``, ``<s>``, ``</s>``.
        force: replace ``output_dir`` when it exists and is not empty.

    Raises:
        ValueError: a model CTranslate2 cannot run (not an EncoderDecoder, ReLA attention, an
            activation it lacks), a vocabulary that does not fit, or an existing non-empty
            ``output_dir`` without ``force``. Nothing is written then.
        ImportError: ``ctranslate2`` is not installed.
    """
    if not isinstance(model, EncoderDecoder):
        raise ValueError(f"export_ctranslate2 takes a gatezoo EncoderDecoder, got {type(model).__name__}")
    cfg = model.config
    rela = [place for place in MT_ATTENTION_PLACES if cfg.attention_at(place) != "softmax"]
    if rela:
        raise ValueError(f"CTranslate2 has no rectified linear attention (ReLA), which this model uses in its "
                         f"{', '.join(rela)} attention; only softmax EncoderDecoder models can be exported")
    enc_act = _stack_activation(model.encoder, cfg.heads, cfg.dim, ("attn",), "encoder")
    dec_act = _stack_activation(model.decoder, cfg.heads, cfg.dim, ("self_attn", "cross_attn"), "decoder")
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    if any(n.eps != cfg.norm_eps for n in norms):
        raise ValueError(f"CTranslate2 takes one LayerNorm epsilon; the model's norms use "
                         f"{sorted({n.eps for n in norms})}")
    vocabulary = _check_vocabulary(vocabulary, cfg.vocab_size)
    output_dir = Path(output_dir)
    _check_output_dir(output_dir, force)

    spec = _build_spec(model, vocabulary, enc_act, dec_act)

    parent = output_dir.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{output_dir.name}.tmp-{uuid.uuid4().hex[:12]}"  # mkdir, unlike mkdtemp, keeps the umask
    tmp.mkdir()
    old = parent / f".{output_dir.name}.old-{uuid.uuid4().hex[:12]}"
    try:
        spec.save(str(tmp))
        if output_dir.exists():
            os.replace(output_dir, old)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not output_dir.exists():
            os.replace(old, output_dir)  # put the previous directory back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
    return output_dir
