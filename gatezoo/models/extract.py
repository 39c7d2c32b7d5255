"""A task's sub-network of a model with task-level mixture-of-experts routing, as a smaller model.

Kudugunta et al. 2021, "Beyond Distillation: Task-level Mixture-of-Experts for Efficient
Inference": when every MoE layer routes by task alone, the experts a task uses are fixed, so the
task's sub-network (the shared layers plus, in each MoE layer, only that task's k experts) can be
served on its own, without the other experts and without task ids.
"""

from __future__ import annotations

import copy

from torch import nn

from gatezoo.blocks import extract_task_experts
from gatezoo.blocks.checks import ArgumentTypeError

# the one base class of every MoE layer (MoEFeedForward, MoLELinear); the blocks keep it private
from gatezoo.blocks.moe import _MoEModule

__all__ = ["extract_task_model"]


def extract_task_model(model: nn.Module, task) -> nn.Module:
    """A copy of ``model`` for task ``task`` alone, every MoE layer replaced by its sub-network.

    Every mixture-of-experts layer inside ``model`` must route by task alone (router
    ``task_aware`` with ``mode="task"``): each becomes
    :func:`~gatezoo.blocks.extract_task_experts` of it (a :class:`~gatezoo.blocks.MoEFeedForward`
    the task's k experts with their fixed weights, a :class:`~gatezoo.blocks.MoLELinear` a
    merged ``nn.Linear``; layers inside a :class:`~gatezoo.blocks.PreGatedMoEStack` alike, the
    stack keeping its residual loop). Everything else is deep-copied; the unused experts are
    not copied at all. The copy computes what ``model`` computes on inputs of that task (see
    :func:`~gatezoo.blocks.extract_task_experts` for capacity and dtypes), with fewer
    parameters and no task ids: it has no router and no MoE layer left, so
    :func:`~gatezoo.blocks.set_task_ids` and the auxiliary losses no longer apply. ``model`` is
    left unchanged.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``task`` not an int (or a 0-dim
            integer tensor).
        ValueError: ``model`` has no MoE layer; a MoE layer routes at token level (its routing
            depends on the tokens, so it has no fixed sub-network; the message names the
            layer); ``task`` lies outside a layer's ``[0, num_tasks)``.
    """
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, _MoEModule)]
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) has no mixture-of-experts layer: there is no task "
                         f"sub-network to extract")
    # every layer is checked (and extracted from the original) before anything is copied
    memo = {}
    for name, layer in layers:
        where = f"MoE layer {name!r}" if name else f"model ({type(model).__name__})"
        try:
            memo[id(layer)] = extract_task_experts(layer, task)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{where}: {err}") from err
    # deepcopy takes the memo's entries for the objects it meets: each MoE layer becomes its
    # sub-network wherever the model refers to it, and its experts are never copied
    return copy.deepcopy(model, memo)
