"""An encoder-decoder Transformer for translation, with attention and feed-forward by name.

``EncoderDecoder`` is the pre-norm Transformer of Vaswani et al. (2017) as most toolkits train it
today: a joint (source and target) vocabulary whose one embedding matrix feeds the encoder and
the decoder and is the output projection (``tie_source_embedding=False`` gives the encoder a
table of its own, the ReLA authors' setup), embeddings scaled by sqrt(dim) plus sinusoidal
positions, pre-norm layers with a final LayerNorm after each stack (``norm_position="post"``
gives the original post-norm layers instead). The attention of all three
places (encoder self-, decoder causal self- and cross-attention) is chosen by name, ``softmax``
or ``rela`` (rectified linear attention with its gated RMS output norm, Zhang et al. 2021), and
``encoder_attention``, ``decoder_attention`` and ``cross_attention`` override it for one place
(e.g. ReLA in the self-attentions and softmax in cross-attention); ``attn_dropout`` drops attention
weights in training (the rectified weights of ReLA, the softmax weights of softmax attention),
in every place. The feed-forward is chosen by name: ``mlp-<activation>`` or any GLU of
:data:`gatezoo.blocks.GLU_VARIANTS`.

Training calls ``model(src_ids, tgt_in_ids) -> logits (B, T_tgt, vocab)``, padding id 0. Search
code uses only the narrow decoding interface, so greedy, beam and any later decoder work for
every attention kind (and for the peers of :mod:`gatezoo.train.peers.translation`):

- ``memory = model.encode(src_ids)``: a :class:`Memory` (encoder states, source mask and, for a
  multi-task model, each row's task id) with ``select(index)`` to expand sentences into beams or
  drop finished ones;
- ``logits, cache = model.decode_step(tokens, memory, cache)``: the logits (B, vocab) of the
  token after ``tokens`` (B, t), the newest target tokens (t = 1 when decoding step by step;
  ``cache=None`` starts a sentence, whose first token is BOS);
- ``cache.reorder(index)``: keep batch rows ``index`` of every layer's keys and values.

Cross-attention keys and values are computed once per sentence, on the first step, and kept in
the cache.

Multi-task models (``ffn="moe"`` with ``router="task_aware"``) take each sentence's task:
``model(src, tgt_in, task_ids=...)`` and ``model.encode(src, task_ids=...)``, an int (every
row) or a (B,) integer tensor with ids in ``[0, num_tasks)``. The :class:`Memory` keeps them, one
per row, so ``decode_step`` and ``Memory.select`` (beam search regrouping rows) keep every row
with its own task and search code passes task ids to ``encode`` alone. Such a model refuses a
call without task ids, and every other model refuses task ids (they would be ignored).

Inputs are checked: token ids must be (batch, length) integer tensors with ids in
[0, vocab_size) (float ids are a TypeError, not truncated), ``src`` and ``tgt_in`` (or the decoding
step's ``tokens`` and the :class:`Memory`) must have the same batch size, and a batch of zero
sentences gives empty logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from gatezoo.blocks import (
    GLU_FAMILIES,
    GLU_VARIANTS,
    MLP_ACTIVATIONS,
    Dropout,
    KVCache,
    ReLAAttention,
    SoftmaxAttention,
)
from gatezoo.blocks.checks import (
    ArgumentTypeError,
    check_bool,
    check_index,
    check_int,
    check_positive,
    check_probability,
    check_str,
)

from .feedforward import build_feedforward
from .moe import MoEOptions, init_experts, inside_moe, link_stack

MT_ATTENTIONS = ("softmax", "rela")
"""Attention names :class:`TranslationConfig` takes."""
MT_ATTENTION_PLACES = ("encoder", "decoder", "cross")
"""Where :class:`TranslationConfig` places attention: encoder self-, decoder causal self- and
cross-attention (the fields ``encoder_attention``, ``decoder_attention``, ``cross_attention``)."""
MT_FFNS = (*(f"mlp-{act}" for act in MLP_ACTIVATIONS), *GLU_VARIANTS, "moe")
"""Feed-forward names :class:`TranslationConfig` takes (``mlp-relu`` is the original Transformer's;
``moe`` is a mixture of experts, see :class:`~gatezoo.models.moe.MoEOptions`)."""

NORM_POSITIONS = ("pre", "post")
"""Where :class:`TranslationConfig` puts each sub-layer's LayerNorm: ``pre`` (before the
sub-layer, inside the residual branch, the default) or ``post`` (after the residual sum, as in
Vaswani et al. 2017 and the ReLA paper's models)."""

PAD_ID, BOS_ID, EOS_ID = 0, 2, 3
"""Special token ids: the tokenizer of :mod:`gatezoo.train.data.text` fixes pad 0, unk 1, BOS 2, EOS 3."""


@dataclass
class TranslationConfig(MoEOptions):
    """Size and parts of an :class:`EncoderDecoder`; ``ffn="moe"`` takes the mixture-of-experts
    fields of :class:`~gatezoo.models.moe.MoEOptions`.

    ``ffn_hidden`` is the hidden width of an MLP feed-forward; a GLU gets 2/3 of it (rounded up
    to a multiple of 8), which keeps the parameter count. ``max_len`` bounds source and target
    lengths in tokens (the target counting BOS); longer input is an error.

    ``attention`` names the attention of all three places; ``encoder_attention`` (encoder
    self-attention), ``decoder_attention`` (decoder causal self-attention) and
    ``cross_attention``, when set, replace it in that place (:meth:`attention_at`).
    ``attn_dropout`` is dropout on the attention weights of every attention (training only),
    besides ``dropout`` on the sub-layer outputs.

    ``tie_source_embedding`` (default True): the encoder reads the one embedding table that also
    embeds the target and is the output projection. False gives the encoder a table of its own
    (``src_embed``); the target embedding and the output projection stay tied.

    The MoE fields apply only with ``ffn="moe"`` (otherwise a non-default value is refused).
    ``router="task_aware"`` makes a multi-task model, which takes task ids on ``forward`` and
    ``encode`` (``router_args`` must set ``num_tasks``, see :meth:`num_tasks`).
    """

    vocab_size: int = 8000
    dim: int = 256
    enc_layers: int = 3
    dec_layers: int = 3
    heads: int = 4
    ffn_hidden: int = 1024
    attention: str = "softmax"
    encoder_attention: str | None = None  # None: ``attention``
    decoder_attention: str | None = None
    cross_attention: str | None = None
    ffn: str = "mlp-relu"
    dropout: float = 0.1
    max_len: int = 256
    norm_eps: float = 1e-5
    bias: bool = True  # biases on the attention projections
    norm_position: str = "pre"  # "pre": x + f(LN x), final LN per stack; "post": LN(x + f(x)), no final LN
    attn_dropout: float = 0.0  # on the attention weights (training only)
    tie_source_embedding: bool = True  # False: the encoder has its own embedding table

    def validate(self) -> None:
        """Raise ValueError (TypeError for a wrong type) naming the first field that is out of range."""
        for name in ("vocab_size", "dim", "enc_layers", "dec_layers", "heads", "ffn_hidden", "max_len"):
            check_int(name, getattr(self, name))
        if self.vocab_size <= EOS_ID:
            raise ValueError(f"vocab_size must exceed the special ids 0..{EOS_ID}, got {self.vocab_size}")
        if self.dim % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide dim ({self.dim})")
        if self.dim % 2:
            raise ValueError(f"dim must be even (sinusoidal positions), got {self.dim}")
        for name in ("attention", *(f"{place}_attention" for place in MT_ATTENTION_PLACES)):
            value = getattr(self, name)
            if value is None and name != "attention":
                continue
            check_str(name, value)
            if value not in MT_ATTENTIONS:
                raise ValueError(f"{name} must be one of {MT_ATTENTIONS}, got {value!r}")
        check_str("ffn", self.ffn)
        if self.ffn not in MT_FFNS and self.ffn not in GLU_FAMILIES:
            raise ValueError(f"ffn must be one of {MT_FFNS}, got {self.ffn!r}")
        if self.ffn == "moe":
            self.validate_moe()
            if self.router == "task_aware" and "num_tasks" not in self.router_args:
                raise ValueError("router='task_aware' needs router_args['num_tasks'] (the number of tasks)")
        else:
            self.reject_unused_moe()
        check_probability("dropout", self.dropout)
        check_probability("attn_dropout", self.attn_dropout)
        check_bool("tie_source_embedding", self.tie_source_embedding)
        check_positive("norm_eps", self.norm_eps)
        check_bool("bias", self.bias)
        check_str("norm_position", self.norm_position)
        if self.norm_position not in NORM_POSITIONS:
            raise ValueError(f"norm_position must be one of {NORM_POSITIONS}, got {self.norm_position!r}")

    @property
    def num_tasks(self) -> int | None:
        """The number of tasks of a multi-task model (``ffn="moe"``, ``router="task_aware"``),
        else None (the model takes no task ids)."""
        if self.ffn == "moe" and self.router == "task_aware":
            return self.router_args.get("num_tasks")
        return None

    def attention_at(self, place: str) -> str:
        """The attention name used at ``place`` (one of :data:`MT_ATTENTION_PLACES`): its own field
        when set, else ``attention``."""
        if place not in MT_ATTENTION_PLACES:
            raise ValueError(f"place must be one of {MT_ATTENTION_PLACES}, got {place!r}")
        own = getattr(self, f"{place}_attention")
        return self.attention if own is None else own


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """(length, dim) position table: sines in the first half, cosines in the second, at
    wavelengths from 2*pi to 10000*2*pi (the tensor2tensor/fairseq layout)."""
    length, dim = check_int("length", length, 0), check_int("dim", dim)
    half = dim // 2
    rate = math.log(10000.0) / max(half - 1, 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float64) * -rate)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def _attention(cfg: TranslationConfig, place: str) -> nn.Module:
    cls = SoftmaxAttention if cfg.attention_at(place) == "softmax" else ReLAAttention
    return cls(cfg.dim, cfg.heads, dropout=cfg.dropout, bias=cfg.bias, attn_dropout=cfg.attn_dropout)


class _Residual(nn.Module):
    """Shared by the layers: ``x + f(LN x)`` (pre-norm) or ``LN(x + f(x))`` (post-norm)."""

    def __init__(self, cfg: TranslationConfig):
        super().__init__()
        self.post_norm = cfg.norm_position == "post"

    def _residual(self, x: torch.Tensor, norm: nn.LayerNorm, f, **kwargs) -> torch.Tensor:
        if self.post_norm:
            return norm(x + f(x, **kwargs))
        return x + f(norm(x), **kwargs)


class EncoderLayer(_Residual):
    """``x + self_attn(LN x)``, then ``x + ffn(LN x)`` (post-norm: ``LN(x + self_attn(x))``, then
    ``LN(x + ffn(x))``)."""

    def __init__(self, cfg: TranslationConfig):
        super().__init__(cfg)
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = _attention(cfg, "encoder")
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = build_feedforward(cfg.ffn, cfg.dim, cfg.ffn_hidden, cfg.dropout, cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self._residual(x, self.norm1, self.attn, key_padding_mask=mask)
        return self._residual(x, self.norm2, self.ffn, **_task_kwargs(task_ids))


class DecoderLayer(_Residual):
    """``x + self_attn(LN x, causal)``, ``x + cross_attn(LN x, memory)``, ``x + ffn(LN x)`` (or
    each as ``LN(x + f(x))`` when post-norm)."""

    def __init__(self, cfg: TranslationConfig):
        super().__init__(cfg)
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.self_attn = _attention(cfg, "decoder")
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.cross_attn = _attention(cfg, "cross")
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = build_feedforward(cfg.ffn, cfg.dim, cfg.ffn_hidden, cfg.dropout, cfg)

    def forward(self, x, memory, memory_mask, self_cache=None, cross_cache=None, task_ids=None):
        x = self._residual(x, self.norm1, self.self_attn, causal=True, cache=self_cache)
        x = self._residual(x, self.norm2, self.cross_attn, context=memory, key_padding_mask=memory_mask,
                           cache=cross_cache)
        return self._residual(x, self.norm3, self.ffn, **_task_kwargs(task_ids))


def _task_kwargs(task_ids) -> dict:
    # only MoE feed-forwards take task_ids; the model refuses task ids unless its router uses them
    return {} if task_ids is None else {"task_ids": task_ids}


@dataclass
class Memory:
    """The encoder's output for a batch: ``states`` (B, S, dim) and ``mask`` (B, S), True = a
    real source token; ``task_ids`` (B,) int64, each row's task (a multi-task model), or None."""

    states: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor | None = None  # the encoder row each row is a copy of (None: row i is row i)
    task_ids: torch.Tensor | None = None

    def source_rows(self) -> torch.Tensor:
        """The encoder output row that each row holds (1-D LongTensor)."""
        if self.rows is not None:
            return self.rows
        return torch.arange(self.states.shape[0], device=self.states.device)

    def select(self, index: torch.Tensor) -> Memory:
        """The rows ``index`` (1-D LongTensor), e.g. each sentence repeated once per beam.

        When every selected row holds the same sentence as the row it replaces (beam search
        reordering beams within their sentences), the content is unchanged and ``self`` is
        returned without copying."""
        check_index("index", index, self.states.shape[0])
        index = index.to(self.states.device)
        rows = self.source_rows()
        new = rows.index_select(0, index)
        if new.shape == rows.shape and torch.equal(new, rows):
            return self
        tasks = None if self.task_ids is None else self.task_ids.index_select(0, index)
        return Memory(self.states.index_select(0, index), self.mask.index_select(0, index), new, tasks)

    def __len__(self) -> int:
        return self.states.shape[0]


class DecoderCache:
    """What the decoder keeps between steps: one self- and one cross-attention :class:`KVCache`
    per layer, and the number of target positions seen."""

    def __init__(self, layers: int, rows: torch.Tensor | None = None):
        self.self_attn = [KVCache() for _ in range(layers)]
        self.cross_attn = [KVCache() for _ in range(layers)]
        self.length = 0
        self.rows = rows  # the source sentence of each row (Memory.source_rows), None if unknown

    def batch_size(self) -> int | None:
        """The number of rows the cached keys hold (None before the first step)."""
        for cache in (*self.self_attn, *self.cross_attn):
            if cache.k is not None:
                return cache.k.shape[0]
        return None if self.rows is None else self.rows.shape[0]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` of every cache, in that order.

        Cross-attention keys and values depend only on the source sentence: when every selected
        row holds the same sentence as the row it replaces (beams reordered within their
        sentences), they are left in place instead of copied."""
        check_index("index", index, self.batch_size())
        for cache in self.self_attn:
            cache.reorder(index)
        if self.rows is not None:
            new = self.rows.index_select(0, index.to(self.rows.device))
            if new.shape == self.rows.shape and torch.equal(new, self.rows):
                return
            self.rows = new
        for cache in self.cross_attn:
            cache.reorder(index)


def check_ids(name: str, ids, vocab_size: int, max_len: int) -> None:
    """Raise a clear error unless ``ids`` is a (batch, length) int64 or int32 tensor of token ids
    below ``vocab_size`` with ``1 <= length <= max_len``: TypeError for another type or dtype (float
    ids are not truncated; uint8, int16, bool are refused), ValueError for a shape or an id out of
    range."""
    if not isinstance(ids, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a LongTensor of token ids, got {type(ids).__name__}")
    # embedding lookups take int64 or int32 ids only; a narrower dtype would fail deep inside torch
    if ids.dtype not in (torch.int64, torch.int32):
        raise ArgumentTypeError(f"{name} must be a (batch, length) integer tensor of token ids (int64 or int32), got "
                                f"{ids.dtype} of shape {tuple(ids.shape)}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must be a (batch, length) integer tensor, got {ids.dtype} of shape "
                         f"{tuple(ids.shape)}")
    if ids.shape[1] < 1:
        raise ValueError(f"{name} must hold at least one token per row, got shape {tuple(ids.shape)}")
    if ids.shape[1] > max_len:
        raise ValueError(f"{name} has length {ids.shape[1]}, longer than the model's max_len={max_len}; "
                         f"shorten the input or build the model with a larger max_len")
    # the range check reads the ids (a host sync), which a torch.compile / export trace cannot do
    if ids.numel() and not torch.compiler.is_compiling() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"{name} holds ids outside [0, vocab_size={vocab_size}): min {int(ids.min())}, "
                         f"max {int(ids.max())}")


def _check_memory(memory, name: str, batch: int) -> None:
    """``memory`` must be a :class:`Memory` of ``batch`` rows (those of the ids ``name``)."""
    if not isinstance(memory, Memory):
        raise ArgumentTypeError(f"memory must be a Memory (from model.encode(src)), got {type(memory).__name__}")
    rows = memory.states.shape[0]  # not len(memory): __len__ makes an int of an export's symbolic batch
    if rows != batch:
        raise ValueError(f"{name} has batch size {batch} but memory holds {rows} sentences; select the "
                         f"memory's rows to match (memory.select(index))")


class EncoderDecoder(nn.Module):
    """Pre-norm (or post-norm) encoder-decoder Transformer with tied embeddings (see the module docstring).

    ``embed`` embeds the target and is the output projection (and embeds the source too unless
    ``tie_source_embedding=False``, which adds ``src_embed`` for the source).

    >>> model = EncoderDecoder(TranslationConfig(vocab_size=8000, attention="rela"))
    >>> logits = model(src_ids, tgt_in_ids)            # (B, T, 8000)
    """

    def __init__(self, cfg: TranslationConfig | None = None, **overrides):
        super().__init__()
        if cfg is not None and overrides:
            raise TypeError(f"pass either a config or field overrides, not both (got {sorted(overrides)})")
        if cfg is not None and not isinstance(cfg, TranslationConfig):
            raise ArgumentTypeError(f"cfg must be a TranslationConfig (or pass its fields as keyword arguments), got "
                                    f"{type(cfg).__name__}")
        cfg = TranslationConfig(**overrides) if cfg is None else cfg
        cfg.validate()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim, padding_idx=PAD_ID)
        # only when untied: a tied model's state dict is what it always was
        self.src_embed = None if cfg.tie_source_embedding else nn.Embedding(cfg.vocab_size, cfg.dim,
                                                                            padding_idx=PAD_ID)
        self.register_buffer("positions", sinusoidal_positions(cfg.max_len, cfg.dim), persistent=False)
        self.drop = Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))
        post = cfg.norm_position == "post"  # post-norm stacks end in a LayerNorm already
        self.enc_norm = nn.Identity() if post else nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        link_stack(cfg, [layer.ffn for layer in self.encoder])
        link_stack(cfg, [layer.ffn for layer in self.decoder])
        self.dec_norm = nn.Identity() if post else nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self._init_weights()

    def _init_weights(self):
        skip = inside_moe(self)  # routers keep their own initialisation
        init_experts(self, nn.init.xavier_uniform_)  # each expert like the dense layer it stands for
        for m in self.modules():
            if isinstance(m, nn.Linear) and id(m) not in skip:
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for table in (self.embed, self.src_embed):
            if table is not None:
                nn.init.normal_(table.weight, std=self.config.dim ** -0.5)
                with torch.no_grad():
                    table.weight[PAD_ID].zero_()

    @property
    def source_embedding(self) -> nn.Embedding:
        """The table that embeds source tokens: ``src_embed`` when untied, else ``embed``."""
        return self.embed if self.src_embed is None else self.src_embed

    def _embed(self, ids: torch.Tensor, start: int = 0, table: nn.Embedding | None = None) -> torch.Tensor:
        x = (self.embed if table is None else table)(ids) * math.sqrt(self.config.dim)
        return self.drop(x + self.positions[start:start + ids.shape[1]].to(x.dtype))

    @property
    def num_tasks(self) -> int | None:
        """The number of tasks of a multi-task model (router ``task_aware``), else None."""
        return self.config.num_tasks

    def _task_ids(self, task_ids, batch: int, device) -> torch.Tensor | None:
        """``task_ids`` checked and made a (batch,) int64 tensor on ``device`` (None stays None
        for a model without tasks)."""
        tasks = self.num_tasks
        if tasks is None:
            if task_ids is not None:
                raise ValueError("task_ids were given, but this model has no task-aware router (ffn='moe' with "
                                 "router='task_aware'), so it would ignore them; pass task_ids=None")
            return None
        if task_ids is None:
            raise ValueError(f"this model routes by task (router='task_aware', num_tasks={tasks}): pass task_ids, "
                             f"an int or a (batch,) integer tensor with ids in [0, {tasks})")
        if isinstance(task_ids, torch.Tensor) and task_ids.dim() == 0:
            task_ids = int(task_ids) if not (task_ids.is_floating_point() or task_ids.is_complex()
                                            or task_ids.dtype == torch.bool) else task_ids
        if isinstance(task_ids, int) and not isinstance(task_ids, bool):
            if not 0 <= task_ids < tasks:
                raise ValueError(f"task_ids must lie in [0, num_tasks={tasks}), got {task_ids}")
            return torch.full((batch,), task_ids, dtype=torch.int64, device=device)
        if (not isinstance(task_ids, torch.Tensor) or task_ids.is_floating_point() or task_ids.is_complex()
                or task_ids.dtype == torch.bool):
            kind = task_ids.dtype if isinstance(task_ids, torch.Tensor) else type(task_ids).__name__
            raise ArgumentTypeError(f"task_ids must be an int or a (batch,) integer tensor, got {kind}")
        if tuple(task_ids.shape) != (batch,):
            raise ValueError(f"task_ids must be an int or hold one id per sentence, shape ({batch},), got "
                             f"{tuple(task_ids.shape)}")
        if batch and not torch.compiler.is_compiling() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= tasks):
            raise ValueError(f"task_ids must lie in [0, num_tasks={tasks}), got min {int(task_ids.min())}, "
                             f"max {int(task_ids.max())}")
        return task_ids.to(device=device, dtype=torch.int64)

    def encode(self, src: torch.Tensor, task_ids=None) -> Memory:
        """Encoder states of ``src`` (B, S) token ids, 0 = padding; ``task_ids`` (a multi-task
        model only): an int or a (B,) integer tensor, kept in the :class:`Memory`."""
        check_ids("src", src, self.config.vocab_size, self.config.max_len)
        tasks = self._task_ids(task_ids, src.shape[0], src.device)
        mask = src != PAD_ID
        x = self._embed(src, table=self.source_embedding)
        for layer in self.encoder:
            x = layer(x, mask, tasks)
        return Memory(self.enc_norm(x), mask, task_ids=tasks)

    def decode(self, tgt_in: torch.Tensor, memory: Memory) -> torch.Tensor:
        """Logits (B, T, vocab) of every next token of ``tgt_in`` (teacher forcing)."""
        check_ids("tgt_in", tgt_in, self.config.vocab_size, self.config.max_len)
        _check_memory(memory, "tgt_in", tgt_in.shape[0])
        x = self._embed(tgt_in)
        self._check_memory_tasks(memory)
        for layer in self.decoder:
            x = layer(x, memory.states, memory.mask, task_ids=memory.task_ids)
        return self.dec_norm(x) @ self.embed.weight.t()

    def _check_memory_tasks(self, memory: Memory) -> None:
        # a Memory built by hand (or by another model) may lack the task ids the decoder needs
        if (memory.task_ids is None) != (self.num_tasks is None):
            raise ValueError("memory.task_ids must be set exactly when the model routes by task; build the memory "
                             "with this model's encode(src, task_ids=...)")

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, task_ids=None) -> torch.Tensor:
        """Logits (B, T_tgt, vocab) for ``src`` (B, S) and ``tgt_in`` (B, T_tgt, BOS first), pad 0;
        ``task_ids`` as for :meth:`encode` (a multi-task model only).

        Padding positions of ``tgt_in`` need no mask: the decoder is causal, so they only
        influence their own (ignored) outputs."""
        both_2d = all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in (src, tgt_in))
        if both_2d and tgt_in.shape[0] != src.shape[0]:  # the rest is checked by encode and decode
            raise ValueError(f"tgt_in has batch size {tgt_in.shape[0]} but src has {src.shape[0]}; row i of tgt_in "
                             f"must be the target of row i of src")
        return self.decode(tgt_in, self.encode(src, task_ids))

    def decode_step(self, tokens: torch.Tensor, memory: Memory, cache: DecoderCache | None = None
                    ) -> tuple[torch.Tensor, DecoderCache]:
        """Logits (B, vocab) of the token after ``tokens`` (B, t): the newest target tokens, which
        follow the ``cache.length`` already decoded (the first call, with ``cache=None``, gets BOS).
        Returns the logits and the updated cache; equal to :meth:`decode` on the whole prefix."""
        check_ids("tokens", tokens, self.config.vocab_size, self.config.max_len)
        _check_memory(memory, "tokens", tokens.shape[0])
        self._check_memory_tasks(memory)
        if cache is None:
            cache = DecoderCache(len(self.decoder), memory.source_rows())
        elif not isinstance(cache, DecoderCache):
            raise ArgumentTypeError(f"cache must be a DecoderCache (or None to start), got {type(cache).__name__}")
        elif len(cache.self_attn) != len(self.decoder):
            raise ValueError(f"cache holds {len(cache.self_attn)} decoder layers, but this model has "
                             f"{len(self.decoder)}; start with cache=None")
        rows = cache.batch_size()
        if rows is not None and rows != tokens.shape[0]:
            raise ValueError(f"cache holds keys for batch size {rows}, but tokens has batch size {tokens.shape[0]}; "
                             f"start a new cache (cache=None) or cache.reorder(index) it")
        start = cache.length
        if start + tokens.shape[1] > self.config.max_len:
            raise ValueError(f"decoding past the model's max_len={self.config.max_len} target positions")
        x = self._embed(tokens, start)
        for layer, sc, cc in zip(self.decoder, cache.self_attn, cache.cross_attn):
            x = layer(x, memory.states, memory.mask, sc, cc, task_ids=memory.task_ids)
        cache.length = start + tokens.shape[1]
        return self.dec_norm(x[:, -1]) @ self.embed.weight.t(), cache
