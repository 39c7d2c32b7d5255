"""nn.Modules built on :mod:`gatezoo.kernels`: gated activations, feed-forwards, norms,
attention, token-mixing (MLP-Mixer, NiNformer) blocks, Kolmogorov-Arnold layers, and
mixture-of-experts routers and layers. Every constructor and forward checks its arguments
(:mod:`gatezoo.blocks.checks`): a wrong type raises :class:`ArgumentTypeError` (a TypeError), a
wrong value or shape ValueError, each naming the argument."""

from .activation import (
    GLU_FAMILIES,
    GLU_VARIANTS,
    MLP_ACTIVATIONS,
    GatedAct,
    GLUFeedForward,
    Mlp,
    glu_hidden_features,
    glu_variant,
)
from .attention import KVCache, SoftmaxAttention
from .checks import ArgumentTypeError
from .dropout import Dropout
from .hyper import GATES, HyperConv2d, HyperLinear, RateDropout, hyper_gate, hyper_layers, set_hyperparameters
from .kan import GRKAN, KANLayer
from .mixing import MixerBlock, NiNBlock, TokenMixing
from .moe import (
    EXPERTS,
    MoEFeedForward,
    MoELayers,
    MoLELinear,
    PreGatedMoEStack,
    TaskExpertsFeedForward,
    extract_task_experts,
    link_pregated,
    moe_aux_loss,
    moe_layers,
    moe_stats,
    reset_moe_stats,
    set_task_ids,
    unlink_pregated,
)
from .moe_conv import MoEConv2d, moe_conv2d_reference
from .norm import GatedRMSNorm, RMSNorm
from .rela import ReLAAttention
from .routing import (
    ROUTERS,
    AdaptiveThresholdRouter,
    GRKANRouter,
    GumbelSoftmaxRouter,
    ModifiedSoftmaxRouter,
    Router,
    RoutingResult,
    SoftmaxRouter,
    TaskAwareRouter,
    TopKRouter,
    adamole_aux_loss,
    make_router,
    router_z_loss,
    switch_balance_loss,
)

__all__ = [
    "ArgumentTypeError", "Dropout",
    "GLU_FAMILIES", "GLU_VARIANTS", "MLP_ACTIVATIONS", "GatedAct", "GatedRMSNorm", "GLUFeedForward", "KVCache",
    "MixerBlock", "Mlp", "MoEConv2d", "moe_conv2d_reference", "NiNBlock",
    "ReLAAttention", "RMSNorm", "SoftmaxAttention", "TokenMixing", "glu_hidden_features",
    "glu_variant",
    # hyper-gated layers (Self-Tuning Networks)
    "GATES", "HyperConv2d", "HyperLinear", "RateDropout", "hyper_gate", "hyper_layers", "set_hyperparameters",
    # Kolmogorov-Arnold layers
    "GRKAN", "KANLayer",
    # mixture of experts
    "EXPERTS", "ROUTERS", "AdaptiveThresholdRouter", "GRKANRouter", "GumbelSoftmaxRouter", "ModifiedSoftmaxRouter",
    "MoEFeedForward", "MoLELinear", "PreGatedMoEStack", "Router", "RoutingResult", "SoftmaxRouter",
    "TaskAwareRouter", "TopKRouter", "MoELayers", "adamole_aux_loss", "link_pregated", "make_router",
    "moe_aux_loss", "moe_layers", "moe_stats", "reset_moe_stats", "router_z_loss", "set_task_ids",
    "switch_balance_loss", "unlink_pregated",
    # task-level sub-networks
    "TaskExpertsFeedForward", "extract_task_experts",
]
