"""The federated mixture of experts of FedJETs (Dun et al. 2023): a common expert whose embedding
feeds the gate, and experts of which each client runs a few.

    common = MLPClassifier(784, 64, 10)      # trained first (FedAvg), then frozen
    moe = FedMoE(common, [MLPClassifier(784, 64, 10) for _ in range(5)])
    log_probs = moe(x, selected=[1, 3])      # a client that holds experts 1 and 3

For an input x, the gate scores every expert from the common expert's embedding ``h(x)``
(detached: the gate does not train the common expert), ``s = W h(x) + c``. A client runs only its
``selected`` experts S; each input mixes them with the softmax of its scores over S,

    p(y | x) = sum_{e in S} softmax_S(s)_e * softmax(f_e(x))_y,

and :meth:`FedMoE.forward` returns ``log p(y | x)`` (log-probabilities, so ``F.nll_loss`` and
``argmax`` apply). :meth:`FedMoE.gate_probs` gives the softmax over all experts, which a client
averages over its inputs to tell the server which experts it needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gatezoo.blocks.checks import check_int

__all__ = ["FedMoE", "MLPClassifier", "dense_hidden_for"]


class MLPClassifier(nn.Module):
    """``Linear(inputs, hidden) -> ReLU -> Linear(hidden, classes)`` on flattened inputs;
    :meth:`embed` gives the hidden activations (the common expert's embedding)."""

    def __init__(self, inputs: int, hidden: int, classes: int):
        super().__init__()
        for name, value in (("inputs", inputs), ("hidden", hidden), ("classes", classes)):
            check_int(name, value, minimum=1)
        self.hidden = nn.Linear(inputs, hidden)
        self.out = nn.Linear(hidden, classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The hidden activations ``relu(W1 x + b1)`` of the flattened input, (B, hidden)."""
        return F.relu(self.hidden(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, classes)."""
        return self.out(self.embed(x))

    def macs(self) -> int:
        """Multiply-accumulates per input."""
        return self.hidden.in_features * self.hidden.out_features + self.out.in_features * self.out.out_features


def dense_hidden_for(inputs: int, classes: int, macs: int) -> int:
    """The hidden width of an :class:`MLPClassifier` with at least ``macs`` multiply-accumulates
    per input: the dense model of equal per-client compute."""
    return max(1, -(-macs // (inputs + classes)))


class FedMoE(nn.Module):
    """A common expert (frozen here: its embedding feeds the gate), ``E`` experts and a linear
    gate over the embedding. See the module docstring for the mixture."""

    def __init__(self, common: MLPClassifier, experts: Sequence[nn.Module]):
        super().__init__()
        if not isinstance(common, MLPClassifier):
            raise TypeError(f"common must be an MLPClassifier, got {type(common).__name__}")
        if len(experts) < 1:
            raise ValueError(f"experts must hold at least one expert, got {len(experts)}")
        self.common = common
        self.experts = nn.ModuleList(experts)
        self.gate = nn.Linear(common.hidden.out_features, len(experts))

    @property
    def num_experts(self) -> int:
        """E."""
        return len(self.experts)

    def gate_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The gate's scores (B, E) from the common expert's detached embedding."""
        with torch.no_grad():
            h = self.common.embed(x)
        return self.gate(h)

    def gate_probs(self, x: torch.Tensor) -> torch.Tensor:
        """The gate's softmax over all E experts (B, E)."""
        return self.gate_logits(x).softmax(-1)

    def _selected(self, selected: Sequence[int] | None) -> list[int]:
        if selected is None:
            return list(range(self.num_experts))
        sel = [int(e) for e in selected]
        if not sel or len(set(sel)) != len(sel) or min(sel) < 0 or max(sel) >= self.num_experts:
            raise ValueError(f"selected must be distinct expert indices in [0, {self.num_experts}), got {selected!r}")
        return sel

    def forward(self, x: torch.Tensor, selected: Sequence[int] | None = None) -> torch.Tensor:
        """``log p(y | x)`` (B, classes) of the mixture of the ``selected`` experts (all when None)."""
        sel = self._selected(selected)
        weights = self.gate_logits(x)[:, sel].log_softmax(-1)  # (B, S)
        expert_lp = torch.stack([self.experts[e](x).log_softmax(-1) for e in sel], dim=1)  # (B, S, C)
        return torch.logsumexp(weights.unsqueeze(-1) + expert_lp, dim=1)

    def macs(self, k: int) -> int:
        """Multiply-accumulates per input of a client running ``k`` experts (common expert, gate,
        k experts)."""
        expert = self.experts[0].macs() if hasattr(self.experts[0], "macs") else 0
        return self.common.hidden.in_features * self.common.hidden.out_features + self.gate.in_features * \
            self.num_experts + k * expert
