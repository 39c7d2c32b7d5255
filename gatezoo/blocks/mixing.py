"""Token-mixing blocks: MLP-Mixer (Tolstikhin et al. 2021) and NiNformer (Abdullah & Aydin 2024).

Both mix along the token axis with :func:`gatezoo.kernels.token_mixing`, which fuses the two
token-axis matmuls, their biases, the GELU and the residual (no transposes are materialised).
Inputs are (B, N, dim): N tokens of width dim, floating point; a batch of B = 0 gives an empty
output. Sizes must be positive ints, ``drop`` in [0, 1), ``shared_norm`` a bool
(:mod:`gatezoo.blocks.checks`); an input of the wrong shape or an integer dtype raises naming it.
"""

from __future__ import annotations

import torch
from torch import nn

from gatezoo.kernels import token_mixing

from .activation import Mlp
from .checks import (
    ArgumentTypeError,
    check_backend,
    check_bool,
    check_dtype,
    check_float_tensor,
    check_int,
    check_optional_int,
    check_probability,
)
from .dropout import Dropout


def _check_tokens(u, num_tokens: int, dim: int, like: torch.Tensor) -> None:
    """``u`` must be a floating-point (batch, num_tokens, dim) tensor of ``like``'s dtype."""
    check_float_tensor("input", u)
    if u.dim() != 3 or u.shape[1] != num_tokens:
        raise ValueError(f"input must have shape (batch, {num_tokens} tokens, dim), got {tuple(u.shape)}")
    if u.shape[2] != dim:
        raise ValueError(f"input must have {dim} channels in its last dimension (dim={dim}), got shape "
                         f"{tuple(u.shape)}")
    check_dtype("input", u, like)


class TokenMixing(nn.Module):
    """``u + MLP_tok(LN(u))``: LayerNorm over channels, then a GELU MLP along the tokens
    (``num_tokens -> hidden -> num_tokens``), then the residual, in one fused op.

    Args:
        num_tokens: N, the length of the token axis (fixed: the MLP's weights span it).
        dim: channel width (the LayerNorm's size).
        hidden: hidden units of the token MLP.
        drop: dropout on the hidden units (when training with ``drop > 0`` the unfused
            composition runs, since the fused op has no dropout).
        backend: ``"auto" | "torch" | "triton"`` for :func:`~gatezoo.kernels.token_mixing`.
    """

    def __init__(self, num_tokens: int, dim: int, hidden: int, drop: float = 0.0, backend: str = "auto"):
        super().__init__()
        for name, v in (("num_tokens", num_tokens), ("dim", dim), ("hidden", hidden)):
            check_int(name, v)
        check_probability("drop", drop)
        check_backend(backend)
        self.num_tokens, self.dim, self.backend = num_tokens, dim, backend
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(num_tokens, hidden)  # weight (hidden, N): W1 of token_mixing
        self.fc2 = nn.Linear(hidden, num_tokens)  # weight (N, hidden): W2
        self.drop = Dropout(drop)

    def forward(self, u: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        """u: (B, N, dim) -> (B, N, dim); ``gate`` (same shape) multiplies the result."""
        _check_tokens(u, self.num_tokens, self.dim, self.fc1.weight)
        if gate is not None:
            check_float_tensor("gate", gate)
            if gate.shape != u.shape:
                raise ValueError(f"gate must have the input's shape {tuple(u.shape)}, got {tuple(gate.shape)}")
        z = self.norm(u)
        if self.training and self.drop.p > 0:
            h = self.drop(nn.functional.gelu(self.fc1(z.transpose(1, 2))))
            y = u + self.fc2(h).transpose(1, 2)
            return y if gate is None else y * gate
        if torch.is_autocast_enabled(u.device.type):
            # the op runs in the autocast dtype; the skip connection keeps u's own precision
            y = u + token_mixing(z, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                                 backend=self.backend)
            return y if gate is None else y * gate
        return token_mixing(z, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, residual=u,
                            gate=gate, backend=self.backend)


class MixerBlock(nn.Module):
    """One MLP-Mixer layer: ``u1 = u + MLP_tok(LN(u))``, ``u2 = u1 + MLP_ch(LN(u1))``.

    Args:
        num_tokens: N. dim: channel width.
        tokens_hidden: hidden units of the token MLP. channels_hidden: of the channel MLP.
        drop: dropout inside both MLPs. backend: token-mixing kernel backend.
    """

    def __init__(self, num_tokens: int, dim: int, tokens_hidden: int, channels_hidden: int, drop: float = 0.0,
                 backend: str = "auto"):
        super().__init__()
        check_int("tokens_hidden", tokens_hidden)
        check_int("channels_hidden", channels_hidden)
        self.tokens = TokenMixing(num_tokens, dim, tokens_hidden, drop=drop, backend=backend)
        self.norm = nn.LayerNorm(dim)
        self.channels = Mlp(dim, channels_hidden, drop=drop)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u: (B, N, dim) -> (B, N, dim)."""
        u = self.tokens(u)
        return u + self.channels(self.norm(u))


class NiNBlock(nn.Module):
    """NiNformer layer (Abdullah & Aydin 2024; docs/architecture.md): a multiplicative gating
    unit whose gate an MLP-Mixer sub-network generates, then a feed-forward, each pre-norm with a
    residual.

        MGU(z) = Lin(z) * Mixer(z)       Mixer = token MLP then channel MLP (:class:`MixerBlock`)
        x = x + MGU(LN(x)) ;  x = x + FFN(LN(x))

    The gate product and the block's residual add run as one fused ``addcmul``.

    Args:
        num_tokens: N. dim: channel width.
        tokens_hidden, channels_hidden: hidden units of the gate sub-network's token and channel
            MLPs.
        ffn_hidden: hidden units of the feed-forward (default 4 * dim).
        ffn: an ``nn.Module`` to use as the feed-forward instead of a GELU :class:`Mlp`
            (e.g. a :class:`~gatezoo.blocks.GLUFeedForward`).
        drop: dropout inside the MLPs. backend: token-mixing kernel backend.
        shared_norm: one LayerNorm (``norm1``) before both sub-blocks, as in the authors' code;
            by default each sub-block has its own (``norm1``, ``norm2``).
    """

    def __init__(self, num_tokens: int, dim: int, tokens_hidden: int, channels_hidden: int,
                 ffn_hidden: int | None = None, ffn: nn.Module | None = None, drop: float = 0.0,
                 backend: str = "auto", shared_norm: bool = False):
        super().__init__()
        check_int("num_tokens", num_tokens)
        check_int("dim", dim)
        ffn_hidden = check_optional_int("ffn_hidden", ffn_hidden)
        if ffn is not None and not isinstance(ffn, nn.Module):
            raise ArgumentTypeError(f"ffn must be an nn.Module or None, got {ffn!r} ({type(ffn).__name__})")
        check_bool("shared_norm", shared_norm)
        self.norm1 = nn.LayerNorm(dim)
        self.lin = nn.Linear(dim, dim)
        self.mixer = MixerBlock(num_tokens, dim, tokens_hidden, channels_hidden, drop=drop, backend=backend)
        self.norm2 = None if shared_norm else nn.LayerNorm(dim)
        self.ffn = ffn if ffn is not None else Mlp(dim, 4 * dim if ffn_hidden is None else ffn_hidden, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, dim) -> (B, N, dim)."""
        tokens = self.mixer.tokens
        _check_tokens(x, tokens.num_tokens, tokens.dim, self.lin.weight)
        z = self.norm1(x)
        x = torch.addcmul(x, self.lin(z), self.mixer(z))  # x + Lin(z) * Mixer(z), one pass
        return x + self.ffn((self.norm1 if self.norm2 is None else self.norm2)(x))
