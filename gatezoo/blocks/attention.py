"""Attention blocks with one interface, so models swap them by name.

``SoftmaxAttention`` (here) and ``ReLAAttention`` (:mod:`gatezoo.blocks.rela`, rectified linear
attention with its output norm, ReLA-g by default) are built on the one base of this module;
``SoftmaxAttention`` (``F.scaled_dot_product_attention`` by default; opt-in flash-attn or xformers
kernels on CUDA with ``impl=``, see docs/gpu.md) both take

    forward(x, context=None, key_padding_mask=None, causal=False, cache=None)

``context`` makes it cross-attention; ``key_padding_mask`` is bool (B, key_len), True = keep;
``cache`` is a :class:`KVCache` for incremental decoding whose outputs equal the full
recomputation.

``attn_dropout`` (both blocks, 0 by default) drops attention weights in training mode only: the
softmax weights through the chosen implementation's own dropout argument (``dropout_p`` of SDPA
and flash-attn, ``p`` of xformers), the rectified weights of ReLA through
:func:`~gatezoo.kernels.rela_attention`'s ``dropout_p``. ``dropout`` is the other one, on the
block's output.

Inputs are checked (:mod:`gatezoo.blocks.checks`): ``x`` and ``context`` must be floating-point
tensors of the block's width and dtype, ``causal`` a bool, ``cache`` a :class:`KVCache` of the same
batch size and layer shape; a context of zero tokens is an error. An empty batch or zero query
tokens give an empty output of shape (B, T, dim).
"""

from __future__ import annotations

import importlib
import re

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .checks import (
    ArgumentTypeError,
    check_bool,
    check_dtype,
    check_float_tensor,
    check_index,
    check_int,
    check_optional_int,
    check_probability,
    check_str,
)
from .dropout import Dropout


class KVCache:
    """Keys and values of the tokens seen so far, (B, Hk, T, head_dim) each.

    Self-attention appends the new step's keys and values; cross-attention computes them from
    the context on the first call and reuses them afterwards. Use one cache per layer and per
    batch: a step whose batch size, heads or head size differ from the cached ones raises
    ValueError (``reorder`` is how beam search changes the rows).
    """

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.cross: bool | None = None  # set by the first call: cross- or self-attention

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def check(self, batch: int, heads: int, head_dim: int) -> None:
        """Raise ValueError unless the cached keys (if any) are for ``batch`` rows of ``heads``
        heads of ``head_dim`` features."""
        if self.k is None:
            return
        b, h, _, d = self.k.shape
        if b != batch:
            raise ValueError(f"cache holds keys for batch size {b}, but this step has batch size {batch}; use a new "
                             f"KVCache per batch (or cache.reorder(index) to change its rows)")
        if (h, d) != (heads, head_dim):
            raise ValueError(f"cache holds keys of {h} heads x {d} features, but this layer has {heads} heads x "
                             f"{head_dim}; use one KVCache per attention layer")

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """Add the keys and values of new positions (self-attention) and return all of them."""
        self.check(k.shape[0], k.shape[1], k.shape[3])
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (a 1-D LongTensor), in that order: beam search calls it to
        follow each beam's parent, to expand a sentence into beams or to drop finished ones."""
        if self.k is not None:
            check_index("index", index, self.k.shape[0])
            index = index.to(self.k.device)
            self.k = self.k.index_select(0, index)
            self.v = self.v.index_select(0, index)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, *, head_dim: int | None = None, kv_heads: int | None = None,
                 dropout: float = 0.0, bias: bool = False, attn_dropout: float = 0.0):
        super().__init__()
        dim, heads = check_int("dim", dim), check_int("heads", heads)
        head_dim, kv_heads = check_optional_int("head_dim", head_dim), check_optional_int("kv_heads", kv_heads, 0)
        check_probability("dropout", dropout)
        self.attn_dropout = check_probability("attn_dropout", attn_dropout)
        check_bool("bias", bias)
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}), or pass head_dim")
            head_dim = dim // heads
        kv_heads = heads if kv_heads is None else kv_heads
        if kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"kv_heads ({kv_heads}) must divide heads ({heads})")
        self.dim, self.heads, self.kv_heads, self.head_dim = dim, heads, kv_heads, head_dim
        self.q = nn.Linear(dim, heads * head_dim, bias=bias)
        self.kv = nn.Linear(dim, 2 * kv_heads * head_dim, bias=bias)
        self.proj = nn.Linear(heads * head_dim, dim, bias=bias)
        self.drop = Dropout(dropout)

    def _attend(self, q, k, v, key_padding_mask, causal):
        raise NotImplementedError

    def _attn_p(self) -> float:
        """The attention-weight dropout rate of this call: ``attn_dropout`` in training, else 0."""
        return self.__dict__.get("attn_dropout", 0.0) if self.training else 0.0  # 0: pickled before it existed

    def _output_norm(self, o):
        return o

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, causal: bool = False,
                cache: KVCache | None = None) -> torch.Tensor:
        """x: (B, T, dim). context: (B, S, dim) for cross-attention. key_padding_mask: bool
        (B, key_len), True = keep, over all keys (cached ones included). causal: mask future
        keys, aligned bottom-right so a cached decoding step sees every earlier key."""
        check_float_tensor("x", x)
        if x.dim() != 3 or x.shape[2] != self.dim:
            raise ValueError(f"x must have shape (batch, seq, dim) with dim={self.dim}, got {tuple(x.shape)}")
        check_dtype("x", x, self.q.weight)
        b, t, dim = x.shape
        if context is not None:
            check_float_tensor("context", context)
            if context.dim() != 3 or context.shape[0] != b or context.shape[2] != dim:
                raise ValueError(f"context must have shape (batch={b}, seq, dim={dim}), got {tuple(context.shape)}")
            if context.shape[1] == 0:
                raise ValueError(f"context must hold at least one token (shape (batch, seq >= 1, dim)), got "
                                 f"{tuple(context.shape)}")
            check_dtype("context", context, self.kv.weight)
        check_bool("causal", causal)
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise ArgumentTypeError(f"cache must be a KVCache or None, got {type(cache).__name__}")
            cache.check(b, self.kv_heads, self.head_dim)
            if cache.cross is None:
                cache.cross = context is not None
            elif cache.cross != (context is not None):
                kind = "cross-attention (context given)" if cache.cross else "self-attention (no context)"
                raise ValueError(f"this KVCache was filled by {kind}; use one cache per attention layer and kind")
        if context is None and self._fusable():  # self-attention: q, k, v from one matmul over joined weights
            qkv = F.linear(x, torch.cat([self.q.weight, self.kv.weight]),
                           None if self.q.bias is None else torch.cat([self.q.bias, self.kv.bias]))
            # split on the feature axis: backward joins the three gradients with one cat into the
            # layout the matmul wants (indexing a (.., 2, ..) view instead zero-fills and adds)
            nk = self.kv_heads * self.head_dim
            q, k, v = (y.view(b, t, heads, self.head_dim).transpose(1, 2)
                       for y, heads in zip(qkv.split([self.heads * self.head_dim, nk, nk], dim=-1),
                                           (self.heads, self.kv_heads, self.kv_heads)))
            if cache is not None:
                k, v = cache.append(k, v)
            return self._finish(q, k, v, key_padding_mask, causal, b, t)
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        if context is not None and cache is not None and len(cache):
            k, v = cache.k, cache.v  # cross-attention keys were computed on the first step
        else:
            src = x if context is None else context
            k, v = (y.view(b, src.shape[1], self.kv_heads, self.head_dim).transpose(1, 2)
                    for y in self.kv(src).split(self.kv_heads * self.head_dim, dim=-1))
            if cache is not None:
                k, v = cache.append(k, v)
        return self._finish(q, k, v, key_padding_mask, causal, b, t)

    def _fusable(self) -> bool:
        """True when ``q`` and ``kv`` are plain ``nn.Linear`` layers with no hooks or
        parametrizations, so one matmul over their joined weights stands in for both calls."""
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return False
        return all(type(m) is nn.Linear and not m._forward_hooks and not m._forward_pre_hooks
                   and not parametrize.is_parametrized(m) for m in (self.q, self.kv))

    def _finish(self, q, k, v, key_padding_mask, causal, b, t):
        o = self._attend(q, k, v, key_padding_mask, causal)
        o = self._output_norm(o.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))
        return self.drop(self.proj(o))


SOFTMAX_IMPLS = ("sdpa", "flash_attn", "xformers")
# impl -> (module imported on first use, pip name of the package)
_PEER_MODULES = {"flash_attn": ("flash_attn", "flash-attn"), "xformers": ("xformers.ops", "xformers")}


def _import_peer(impl: str):
    """The module behind ``impl`` (``flash_attn`` or ``xformers.ops``), imported at the first
    forward that needs it: importing gatezoo never imports either package."""
    module, package = _PEER_MODULES[impl]
    try:
        return importlib.import_module(module)
    except (ImportError, OSError) as err:  # OSError: a binary built for another CUDA or torch
        raise ImportError(f"SoftmaxAttention(impl={impl!r}) needs the {package} package, which failed to import "
                          f"({type(err).__name__}: {err}); install the 'gpu' extra on a machine with CUDA "
                          f"(pip install 'gatezoo[gpu]'), or use impl='sdpa'") from err


def _version_at_least(module, major: int, minor: int) -> bool:
    """Whether ``module.__version__`` is at least ``major.minor`` (True when it cannot be read)."""
    parts = re.findall(r"\d+", str(getattr(module, "__version__", "")))[:2]
    return len(parts) < 2 or (int(parts[0]), int(parts[1])) >= (major, minor)


class SoftmaxAttention(_Attention):
    """Standard softmax attention with the same interface as :class:`ReLAAttention`. A query whose
    keys are all masked gets 0 (not NaN).

    Args:
        dim, heads, head_dim, kv_heads, dropout, bias: as for :class:`ReLAAttention`.
        attn_dropout: dropout on the softmax weights in training mode (0 = none): SDPA's and
            flash-attn's ``dropout_p``, xformers' ``p``; their random draws follow torch's
            generator (SDPA) or the package's own.
        impl: which function computes ``softmax(q k^T / sqrt(d)) v``:

            * ``"sdpa"`` (default): ``F.scaled_dot_product_attention`` (PyTorch picks its flash or
              memory-efficient kernels on GPU), on every device and dtype;
            * ``"flash_attn"``: ``flash_attn.flash_attn_func`` of the flash-attn package (the
              ``gpu`` extra), and ``flash_attn_varlen_func`` with a ``key_padding_mask``. CUDA
              tensors in float16 or bfloat16 only (under ``torch.autocast`` the projections give
              those from float32 weights); flash-attn >= 2.1 for causal calls with fewer queries
              than keys (its bottom-right alignment); ``key_padding_mask`` together with
              ``causal=True`` is refused (the packed keys would lose their positions);
            * ``"xformers"``: ``xformers.ops.memory_efficient_attention``, CUDA tensors in
              float16, bfloat16 or float32; padding masks go in as an additive bias tensor.

            A call the chosen implementation cannot serve (a CPU tensor, a dtype or mask it does not
            take) raises an error naming ``impl`` and the argument; it never falls back to SDPA
            silently, as a forced kernel backend never does (docs/architecture.md, "Backend
            dispatch"). Key-value caches work with all three: the cached keys are plain tensors.
            The packages are imported at the first call that needs them; a missing one raises
            ImportError naming the ``gpu`` extra. ``impl`` may be changed on a built module
            (``attn.impl = "flash_attn"``); it is not part of the state dict. See docs/gpu.md.
    """

    def __init__(self, dim: int, heads: int, *, head_dim: int | None = None, kv_heads: int | None = None,
                 dropout: float = 0.0, bias: bool = False, impl: str = "sdpa", attn_dropout: float = 0.0):
        super().__init__(dim, heads, head_dim=head_dim, kv_heads=kv_heads, dropout=dropout, bias=bias,
                         attn_dropout=attn_dropout)
        self.impl = impl

    @property
    def impl(self) -> str:
        """The attention implementation, one of :data:`SOFTMAX_IMPLS`."""
        return self.__dict__.get("_impl", "sdpa")  # modules pickled before impl existed used SDPA

    @impl.setter
    def impl(self, value: str) -> None:
        check_str("impl", value)
        if value not in SOFTMAX_IMPLS:
            raise ValueError(f"impl must be one of {SOFTMAX_IMPLS}, got {value!r}")
        self.__dict__["_impl"] = value

    def extra_repr(self) -> str:
        parts = [] if self.impl == "sdpa" else [f"impl={self.impl!r}"]
        if self.__dict__.get("attn_dropout", 0.0):
            parts.append(f"attn_dropout={self.attn_dropout}")
        return ", ".join(parts)

    def _attend(self, q, k, v, key_padding_mask, causal):
        tq, tk = q.shape[2], k.shape[2]
        if q.numel() == 0:  # an empty batch or no queries: nothing to attend (and no empty launch on GPU)
            return q.new_zeros(q.shape)
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
                got = key_padding_mask.dtype if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask)
                raise TypeError(f"key_padding_mask must be a bool tensor (True = keep), got {got}")
            if tuple(key_padding_mask.shape) != (q.shape[0], tk):
                raise ValueError(f"key_padding_mask must have shape (batch, key_len) = {(q.shape[0], tk)}, "
                                 f"got {tuple(key_padding_mask.shape)}")
            key_padding_mask = key_padding_mask.to(q.device)
        if self.impl == "flash_attn":
            return self._flash_attn(q, k, v, key_padding_mask, causal)
        if self.impl == "xformers":
            return self._xformers(q, k, v, key_padding_mask, causal)
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        p = self._attn_p()
        if key_padding_mask is None and (not causal or tq == tk):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=p)  # fast paths
        keep = self._keep(q, tk, key_padding_mask, causal)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p)
        return torch.where(keep.any(-1, keepdim=True), o, 0.0)

    @staticmethod
    def _keep(q, tk, key_padding_mask, causal):
        """The bool mask (B or 1, 1, Tq, Tk) of the keys each query may see, True = keep."""
        keep = torch.ones(q.shape[2], tk, dtype=torch.bool, device=q.device)
        if causal:  # bottom-right aligned, as in rela_attention
            keep = keep.tril(tk - q.shape[2])
        keep = keep[None, None]
        if key_padding_mask is not None:
            keep = keep & key_padding_mask[:, None, None, :]
        return keep

    def _check_peer_input(self, q, dtypes):
        """Raise unless the queries are CUDA tensors of one of ``dtypes`` (the peers' own errors
        would name neither the module's argument nor the way out)."""
        if q.device.type != "cuda":
            raise ValueError(f"SoftmaxAttention(impl={self.impl!r}) runs on CUDA tensors only, but x is on "
                             f"{q.device}; move the module and x to a GPU, or use impl='sdpa'")
        if q.dtype not in dtypes:
            names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
            raise ArgumentTypeError(f"SoftmaxAttention(impl={self.impl!r}) takes {names} only, but x projects to "
                                    f"{q.dtype} queries; run under torch.autocast('cuda', dtype=torch.bfloat16), "
                                    f"convert the module and x, or use impl='sdpa'")

    def _flash_attn(self, q, k, v, key_padding_mask, causal):
        self._check_peer_input(q, (torch.float16, torch.bfloat16))
        fa = _import_peer("flash_attn")
        b, _, tq, d = q.shape
        tk = k.shape[2]
        if causal and tq != tk and not _version_at_least(fa, 2, 1):
            raise ValueError(f"SoftmaxAttention(impl='flash_attn') with causal=True and {tq} queries for {tk} keys "
                             f"needs flash-attn >= 2.1 (older versions align the causal mask top-left), found "
                             f"{fa.__version__}; upgrade flash-attn or use impl='sdpa'")
        # flash-attn takes (B, T, H, D): transposed views of our (B, H, T, D) tensors, no copies;
        # it reads grouped key/value heads itself (query head h reads h // (H / Hk))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if key_padding_mask is None:
            # causal is bottom-right aligned (flash-attn >= 2.1) and a query with no visible key
            # gets 0, both as in the SDPA path
            return fa.flash_attn_func(q, k, v, dropout_p=self._attn_p(), causal=causal).transpose(1, 2)
        if causal:
            raise ValueError("SoftmaxAttention(impl='flash_attn') cannot combine key_padding_mask with causal=True: "
                             "its variable-length kernel packs the kept keys and would lose their positions; "
                             "drop one of them, or use impl='xformers' or impl='sdpa'")
        # without a causal mask the order of the keys does not matter, so any padding pattern
        # becomes one packed sequence of kept keys per batch row (the variable-length API). A row
        # with no kept key packs its first key instead (no empty sequence reaches the kernel) and
        # its output is set to 0, as in the SDPA path
        empty = ~key_padding_mask.any(1)
        packed = key_padding_mask.clone()
        packed[:, 0] |= empty
        lens = packed.sum(1, dtype=torch.int32)
        cu_k = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
        cu_q = torch.arange(0, (b + 1) * tq, tq, dtype=torch.int32, device=q.device)
        o = fa.flash_attn_varlen_func(q.reshape(b * tq, self.heads, d), k[packed], v[packed], cu_q, cu_k, tq,
                                      int(lens.max()), dropout_p=self._attn_p()).view(b, tq, self.heads, d)
        o = torch.where(empty[:, None, None, None], 0.0, o)
        return o.transpose(1, 2)

    def _xformers(self, q, k, v, key_padding_mask, causal):
        self._check_peer_input(q, (torch.float16, torch.bfloat16, torch.float32))
        xops = _import_peer("xformers")
        b, h, tq, d = q.shape
        tk = k.shape[2]
        if self.kv_heads != self.heads:  # xformers' grouped (5-D) layout has no backward
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, T, H, D) views, as xformers takes them
        p = self._attn_p()
        if key_padding_mask is None and not causal:
            return xops.memory_efficient_attention(q, k, v, p=p).transpose(1, 2)
        if key_padding_mask is None and tq == tk:
            return xops.memory_efficient_attention(q, k, v, attn_bias=xops.LowerTriangularMask(), p=p).transpose(1, 2)
        bottom_right = getattr(getattr(xops, "fmha", None), "attn_bias", None)
        bottom_right = getattr(bottom_right, "LowerTriangularFromBottomRightMask", None)
        if key_padding_mask is None and tq < tk and bottom_right is not None:
            return xops.memory_efficient_attention(q, k, v, attn_bias=bottom_right(), p=p).transpose(1, 2)
        # anything else (a padding mask, or causal with more queries than keys, whose first
        # queries see no key) goes in as an additive bias tensor: -inf where a key is masked,
        # and 0 over the whole row of a query with no visible key, whose output is then set to
        # 0 (a row of -inf would give NaN in the softmax and in the backward)
        keep = self._keep(q.transpose(1, 2), tk, key_padding_mask, causal)  # (B or 1, 1, Tq, Tk)
        seen = keep.any(-1, keepdim=True)
        # xformers wants every stride but the last aligned to 16 bytes: a key axis padded to a
        # multiple of 8, sliced back, and a stride-0 head axis
        width = -(-tk // 8) * 8
        bias = torch.zeros(keep.shape[0], 1, tq, width, dtype=q.dtype, device=q.device)[..., :tk]
        bias.masked_fill_(~keep & seen, float("-inf"))
        o = xops.memory_efficient_attention(q, k, v, attn_bias=bias.expand(b, h, tq, tk), p=p).transpose(1, 2)
        return torch.where(seen, o, 0.0)
