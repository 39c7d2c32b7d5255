"""Translation peers of the gatezoo :class:`~gatezoo.models.EncoderDecoder`, for side-by-side runs.

Both peers default to the size of the preset ``transformer_mt_tiny``: d=256, 3 encoder and 3
decoder layers, 4 heads, feed-forward width 1024, dropout 0.1, max_len 256 (source and target
positions), one joint vocabulary with padding id 0.

``torch_transformer_mt_tiny`` (:class:`TorchTransformerMT`)
    ``torch.nn.Transformer(d_model=256, nhead=4, num_encoder_layers=3, num_decoder_layers=3,
    dim_feedforward=1024, dropout=0.1, activation="relu", batch_first=True, norm_first=True)``:
    pre-norm layers with a final LayerNorm after each stack, biases everywhere, torch's xavier
    initialisation of the stacks. The encoder is torch's own ``TransformerEncoder`` built with
    ``enable_nested_tensor=False`` (passed as ``custom_encoder``), which keeps the layers and
    silences the nested-tensor warning that ``norm_first=True`` triggers. Around it, the same
    embedding as the preset: one ``nn.Embedding(vocab_size, 256, padding_idx=0)`` (normal init,
    std 256**-0.5, padding row zero) scaled by sqrt(256), plus :func:`sinusoidal_positions`,
    then dropout; the output projection is that embedding matrix (``logits = h @ E^T``). So the
    source embedding, the target embedding and the output projection are one tensor, and the
    parameter count equals the preset's. Masks: source key padding in encoder self-attention and
    in cross-attention, a causal mask in decoder self-attention.
``xtransformer_mt_tiny`` (:class:`XTransformerMT`)
    ``x_transformers.XTransformer(dim=256, enc_depth=3, dec_depth=3, enc_heads=4, dec_heads=4,
    enc_attn_dim_head=64, dec_attn_dim_head=64, enc_ff_mult=4, dec_ff_mult=4, enc_num_tokens=V,
    dec_num_tokens=V, enc_max_seq_len=256, dec_max_seq_len=256, tie_token_emb=True,
    {enc,dec}_attn_dropout=0.1, {enc,dec}_ff_dropout=0.1, {enc,dec}_emb_dropout=0.1)`` and
    x-transformers' defaults otherwise, as its users would build it: GELU feed-forward (not
    ReLU), bias-free attention projections, LayerNorm with a gain and no bias, learned absolute
    positions (one table per stack, scaled by dim**-0.5), unscaled token embeddings initialised
    by ``kaiming_normal_``, pre-norm with a final norm per stack, dropout on the attention
    weights and after the feed-forward activation (x-transformers' ``sublayer_dropout`` stays 0).
    ``tie_token_emb=True`` ties only the encoder's and the decoder's token embeddings (the
    decoder's ``TransformerWrapper`` gets the encoder's ``TokenEmbedding``); the decoder's output
    projection ``to_logits`` is a separate bias-free ``Linear``, which XTransformer gives no way
    to tie. The peer then shares that Linear's weight with the token embedding
    (``logits = h @ E^T``, no scale), so all three are one tensor as in the preset;
    ``tie_output=False`` leaves x-transformers' own untied projection (+ vocab_size * dim
    parameters). ``attn_dim_head`` is set to dim // heads, which is x-transformers' default 64 at
    the default size and keeps ``heads`` overrides at width ``dim``. XTransformer's ``forward``
    (which computes its own loss) is not used: the peer calls ``model.encoder`` (returning
    embeddings, source ``mask``) and the decoder's inner ``TransformerWrapper``
    ``model.decoder.net`` with ``context=`` and ``context_mask=`` to get logits.

Both peers train with ``peer(src, tgt_in) -> logits (B, T_tgt, vocab)`` and decode through the
narrow interface of :mod:`gatezoo.eval.decode`: ``encode(src) -> Memory`` and
``decode_step(tokens, memory, cache) -> (logits, cache)``. Unlike the preset, they keep no
key/value cache: :class:`PrefixCache` holds the target prefix and every step recomputes the decoder
over all of it. Decoding speed is not what the peers are compared on (training speed and quality
are), and recomputing keeps each library's own layers untouched.

x-transformers is an optional (dev) dependency, imported only when its peer is built. Overrides
(:func:`create_mt_peer`) take the :class:`~gatezoo.models.translation.TranslationConfig` field
names that apply: ``dim``, ``enc_layers``, ``dec_layers``, ``heads``, ``ffn_hidden``, ``dropout``,
``max_len`` (both peers), ``norm_eps`` (torch peer) and ``tie_output`` (x-transformers peer).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from gatezoo.models.translation import PAD_ID, Memory, TranslationConfig, check_ids, sinusoidal_positions


class PrefixCache:
    """The decoding state of a peer: the target tokens so far, ``tokens`` (B, t), BOS first.

    Peers recompute the decoder over the whole prefix at every step, so this is all they keep."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    @property
    def length(self) -> int:
        """Number of target positions decoded so far (BOS included)."""
        return self.tokens.shape[1]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (1-D LongTensor), in that order."""
        self.tokens = self.tokens.index_select(0, index.to(self.tokens.device))


def _attend_mask(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` (True = real token) with every row that has no real token made all True, so that
    attention over a fully padded sentence stays finite (its outputs are meaningless, not NaN)."""
    return mask | ~mask.any(dim=1, keepdim=True)


def _validated_config(vocab_size: int, dim: int, enc_layers: int, dec_layers: int, heads: int, ffn_hidden: int,
                      dropout: float, max_len: int, norm_eps: float = 1e-5) -> TranslationConfig:
    cfg = TranslationConfig(vocab_size=vocab_size, dim=dim, enc_layers=enc_layers, dec_layers=dec_layers, heads=heads,
                            ffn_hidden=ffn_hidden, dropout=dropout, max_len=max_len, norm_eps=norm_eps)
    cfg.validate()
    return cfg


class _TranslationPeer(nn.Module):
    """The training and decoding interface shared by the peers; subclasses provide
    ``_encode_states(src, attend)`` and ``_decode_logits(tgt, states, attend)``, where ``attend``
    is the source mask from :func:`_attend_mask`."""

    vocab_size: int
    max_len: int

    def _encode_states(self, src: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _decode_logits(self, tgt: torch.Tensor, states: torch.Tensor, attend: torch.Tensor,
                       last_only: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, src: torch.Tensor) -> Memory:
        """Encoder states of ``src`` (B, S) token ids, 0 = padding, as a :class:`Memory` whose mask
        is True at real source tokens."""
        check_ids("src", src, self.vocab_size, self.max_len)
        mask = src != PAD_ID
        return Memory(self._encode_states(src, _attend_mask(mask)), mask)

    def decode(self, tgt_in: torch.Tensor, memory: Memory) -> torch.Tensor:
        """Logits (B, T, vocab) of every next token of ``tgt_in`` (teacher forcing)."""
        check_ids("tgt_in", tgt_in, self.vocab_size, self.max_len)
        return self._decode_logits(tgt_in, memory.states, _attend_mask(memory.mask))

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Logits (B, T_tgt, vocab) for ``src`` (B, S) and ``tgt_in`` (B, T_tgt, BOS first), pad 0.

        Target padding needs no mask: the decoder is causal, so padding only affects its own
        (ignored) outputs."""
        return self.decode(tgt_in, self.encode(src))

    def decode_step(self, tokens: torch.Tensor, memory: Memory, cache: PrefixCache | None = None
                    ) -> tuple[torch.Tensor, PrefixCache]:
        """Logits (B, vocab) of the token after ``tokens`` (B, t), the newest target tokens (the
        first call, with ``cache=None``, gets BOS), and the updated :class:`PrefixCache`.

        Recomputes the decoder over the whole prefix: equal to :meth:`decode` on it."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be a (batch, t) tensor of token ids, got {got}")
        start = 0 if cache is None else cache.length
        if start + tokens.shape[1] > self.max_len:
            raise ValueError(f"decoding past the model's max_len={self.max_len} target positions")
        prefix = tokens if cache is None else torch.cat([cache.tokens, tokens.to(cache.tokens.device)], dim=1)
        check_ids("tokens", prefix, self.vocab_size, self.max_len)
        # only the last position goes through the output projection (the largest matmul)
        logits = self._decode_logits(prefix, memory.states, _attend_mask(memory.mask), last_only=True)
        if cache is None:
            cache = PrefixCache(prefix)
        else:
            cache.tokens = prefix
        return logits, cache


class TorchTransformerMT(_TranslationPeer):
    """``torch.nn.Transformer`` (pre-norm, ReLU, batch first) with the preset's tied, scaled
    embedding, sinusoidal positions and tied output projection (see the module docstring).

    >>> peer = TorchTransformerMT(8000)
    >>> logits = peer(src_ids, tgt_in_ids)          # (B, T, 8000)
    """

    def __init__(self, vocab_size: int, *, dim: int = 256, enc_layers: int = 3, dec_layers: int = 3, heads: int = 4,
                 ffn_hidden: int = 1024, dropout: float = 0.1, max_len: int = 256, norm_eps: float = 1e-5):
        super().__init__()
        cfg = _validated_config(vocab_size, dim, enc_layers, dec_layers, heads, ffn_hidden, dropout, max_len, norm_eps)
        self.vocab_size, self.max_len, self.dim = vocab_size, max_len, dim
        layer = nn.TransformerEncoderLayer(dim, heads, ffn_hidden, dropout, activation="relu", layer_norm_eps=norm_eps,
                                           batch_first=True, norm_first=True)
        encoder = nn.TransformerEncoder(layer, enc_layers, norm=nn.LayerNorm(dim, eps=cfg.norm_eps),
                                        enable_nested_tensor=False)
        self.transformer = nn.Transformer(dim, heads, enc_layers, dec_layers, ffn_hidden, dropout, activation="relu",
                                          custom_encoder=encoder, layer_norm_eps=norm_eps, batch_first=True,
                                          norm_first=True)
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=PAD_ID)
        nn.init.normal_(self.embed.weight, std=dim ** -0.5)
        with torch.no_grad():
            self.embed.weight[PAD_ID].zero_()
        self.register_buffer("positions", sinusoidal_positions(max_len, dim), persistent=False)
        self.drop = nn.Dropout(dropout)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) * math.sqrt(self.dim)
        return self.drop(x + self.positions[:ids.shape[1]].to(x.dtype))

    def _encode_states(self, src: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        return self.transformer.encoder(self._embed(src), src_key_padding_mask=~attend)

    def _decode_logits(self, tgt: torch.Tensor, states: torch.Tensor, attend: torch.Tensor,
                       last_only: bool = False) -> torch.Tensor:
        t = tgt.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=tgt.device).triu(1)  # True = may not attend
        h = self.transformer.decoder(self._embed(tgt), states, tgt_mask=causal, tgt_is_causal=True,
                                     memory_key_padding_mask=~attend)
        return (h[:, -1] if last_only else h) @ self.embed.weight.t()


def _xtransformer_class():
    try:
        with warnings.catch_warnings():  # x-transformers 2.x calls torch.jit.script at import time
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)
            from x_transformers import XTransformer
    except ImportError as e:
        raise ImportError(
            "the peer 'xtransformer_mt_tiny' needs x-transformers, an optional dependency: pip install x-transformers "
            f"(or pip install -e '.[dev]'); original error: {e}"
        ) from e
    return XTransformer


class XTransformerMT(_TranslationPeer):
    """``x_transformers.XTransformer`` at the preset's size with x-transformers' defaults (GELU
    feed-forward, learned positions); token embeddings tied by ``tie_token_emb`` and, unless
    ``tie_output=False``, the decoder's output projection shared with them (see the module
    docstring). The XTransformer is ``self.model``.

    >>> peer = XTransformerMT(8000)
    >>> logits = peer(src_ids, tgt_in_ids)          # (B, T, 8000)
    """

    def __init__(self, vocab_size: int, *, dim: int = 256, enc_layers: int = 3, dec_layers: int = 3, heads: int = 4,
                 ffn_hidden: int = 1024, dropout: float = 0.1, max_len: int = 256, tie_output: bool = True):
        super().__init__()
        _validated_config(vocab_size, dim, enc_layers, dec_layers, heads, ffn_hidden, dropout, max_len)
        ff_mult = ffn_hidden / dim
        if int(dim * ff_mult) != ffn_hidden:
            raise ValueError(f"ffn_hidden={ffn_hidden} is not reachable as int(dim * ff_mult) with dim={dim}")
        if not isinstance(tie_output, bool):
            raise ValueError(f"tie_output must be a bool, got {tie_output!r}")
        xtransformer = _xtransformer_class()
        self.vocab_size, self.max_len, self.dim, self.tie_output = vocab_size, max_len, dim, tie_output
        stack = {"heads": heads, "attn_dim_head": dim // heads, "ff_mult": ff_mult, "num_tokens": vocab_size,
                 "max_seq_len": max_len, "attn_dropout": dropout, "ff_dropout": dropout, "emb_dropout": dropout}
        kwargs = {f"{side}_{k}": v for side in ("enc", "dec") for k, v in stack.items()}
        self.model = xtransformer(dim=dim, tie_token_emb=True, enc_depth=enc_layers, dec_depth=dec_layers, **kwargs)
        if tie_output:
            self.model.decoder.net.to_logits.weight = self.model.encoder.token_emb.emb.weight

    def _encode_states(self, src: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        return self.model.encoder(src, mask=attend, return_embeddings=True)

    def _decode_logits(self, tgt: torch.Tensor, states: torch.Tensor, attend: torch.Tensor,
                       last_only: bool = False) -> torch.Tensor:
        net = self.model.decoder.net
        if not last_only:
            return net(tgt, context=states, context_mask=attend)
        h = net(tgt, context=states, context_mask=attend, return_embeddings=True)
        return net.to_logits(h[:, -1])


_COMMON = ("dim", "enc_layers", "dec_layers", "heads", "ffn_hidden", "dropout", "max_len")
_PEERS: dict[str, tuple[type[_TranslationPeer], tuple[str, ...]]] = {
    "torch_transformer_mt_tiny": (TorchTransformerMT, (*_COMMON, "norm_eps")),
    "xtransformer_mt_tiny": (XTransformerMT, (*_COMMON, "tie_output")),
}


def list_mt_peers() -> list[str]:
    """Names of the translation peers :func:`create_mt_peer` builds."""
    return sorted(_PEERS)


def create_mt_peer(name: str, *, vocab_size: int, **overrides) -> nn.Module:
    """Build the translation peer ``name`` (see :func:`list_mt_peers`) over a joint vocabulary of
    ``vocab_size`` tokens (padding id 0), with ``overrides`` of its defaults (the size of
    ``transformer_mt_tiny``): the ``TranslationConfig`` names ``dim``, ``enc_layers``,
    ``dec_layers``, ``heads``, ``ffn_hidden``, ``dropout``, ``max_len``; ``norm_eps`` for the torch
    peer, ``tie_output`` for the x-transformers peer.

    Raises ``ValueError`` for an unknown name, an override the peer does not take, or a value out
    of range; ``ImportError`` if the peer's library is missing.

    >>> peer = create_mt_peer("torch_transformer_mt_tiny", vocab_size=8000, enc_layers=2)
    """
    if name not in _PEERS:
        raise ValueError(f"name must be one of the translation peers {list_mt_peers()}, got {name!r}")
    cls, accepted = _PEERS[name]
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        raise ValueError(f"{name}: unknown override(s) {unknown}; accepted: {sorted(accepted)}")
    peer = cls(vocab_size, **overrides)
    peer.model_name = name
    return peer
