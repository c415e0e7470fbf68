"""Explanation: what one run returns, with the numbers needed to audit conservation."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import SettingError
from .ir.merges import Merge
from .lrp import reach
from .lrp.explosion import Explosion


def channel_shares(relevance: np.ndarray) -> np.ndarray:
    """[N, C] each channel's relevance total over the sum of |totals| of all channels (zennit-crp's
    ChannelConcept.attribute with abs_norm): how concepts are ranked everywhere in onnxlrp."""
    relevance = np.asarray(relevance, np.float64)
    return relevance / np.maximum(np.abs(relevance).sum(axis=1, keepdims=True), 1e-30)


@dataclass
class Concepts:
    """Conditional relevance at a concept layer (lrp.conditional): K conditions per image, each a
    channel of the layer or a set of them; the relevance pass from those channels alone down to
    the input."""

    layer: str  # the tensor whose channels are the concepts
    sets: np.ndarray  # [N, K, S] int64: the channels of each condition (a set padded with its first)
    relevance: np.ndarray  # [N, K, ...] the input relevance of each condition (the input's layout per row)
    channel_relevance: np.ndarray  # [N, C] the relevance total of every channel at the layer
    channel_activation: np.ndarray | None = None  # [N, C] each channel's largest activation there
    layout: str = "NCHW"

    @property
    def channels(self) -> np.ndarray:
        """[N, K] the channel of each condition (of a set, its first)."""
        return self.sets[..., 0]

    @property
    def shares(self) -> np.ndarray:
        """[N, C] each channel's share of the layer's relevance (channel_shares): the ranking."""
        return channel_shares(self.channel_relevance)

    @property
    def chosen_shares(self) -> np.ndarray:
        """[N, K] the share of each condition's channels (a channel named twice counts once)."""
        n, k, _ = self.sets.shape
        member = np.zeros((n, k, self.shares.shape[1]), bool)
        np.put_along_axis(member, self.sets, True, axis=2)
        return (member * self.shares[:, None, :]).sum(axis=2)

    def heatmap(self) -> np.ndarray:
        """[N, K, H, W] each condition's input relevance summed over colour channels."""
        return self.relevance.sum(axis=2 if self.layout == "NCHW" else 4)


@dataclass
class Explanation:
    """Input relevance for a batch, with the numbers needed to audit conservation."""

    relevance: np.ndarray  # same shape and layout as the model input
    logits: np.ndarray  # [N, K]
    targets: np.ndarray  # [N] the classes explained
    initial: np.ndarray  # [N] relevance the pass started from (target logit or probability)
    merge_sums: np.ndarray  # [N, M, 3]: sums of R, R_skip, R_main at each merge
    merges: list[Merge]
    layout: str = "NCHW"
    layer_sums: np.ndarray | None = None  # [N, L, 3] with trace=True: per op, relevance out, in, sum |R| out
    layer_names: list[str] = field(default_factory=list)  # the L ops, in forward order
    probe: tuple[np.ndarray, np.ndarray] | None = None  # with probe=: (activation, relevance) there
    explosion: Explosion | None = None  # images whose relevance exploded (NaN/Inf are set to 0)
    map: np.ndarray | None = None  # [N, H, W] a layer or gated map computed in the graph (lrp.heatmaps)
    # [N, F] relevance each family of ops did not hand on (lrp.reach.FAMILIES: biases and
    # stabilisers, saturated activations, other); None for gradients, which conserve nothing
    absorbed_by: np.ndarray | None = None
    concepts: Concepts | None = None  # with a concept layer and concepts= asked: conditional relevance

    def layer_report(self, index: int = 0) -> list[dict]:
        """With trace=True: per op (forward order), the relevance at its output, what it passed
        to its inputs, the share it absorbed (negative: created), and `magnitude`, the sum of
        |R| at its output: where positive and negative relevance nearly cancel, float32 totals
        are only good to a fraction of that, so `leak` = (out - in) / magnitude is the
        conservation error that can be held to a tolerance."""
        if self.layer_sums is None:
            raise SettingError("build the Explainer with trace=True to get per-layer relevance")
        return [
            {"node": name, "out": float(out), "in": float(inp), "absorbed": float((out - inp) / out) if out else 0.0,
             "magnitude": float(size), "leak": float((out - inp) / size) if size else 0.0}
            for name, (out, inp, size) in zip(self.layer_names, self.layer_sums[index])
        ]

    @property
    def input_sum(self) -> np.ndarray:
        """[N] total relevance at the input."""
        return self.relevance.reshape(len(self.relevance), -1).sum(axis=1, dtype=np.float64)

    @property
    def absorbed(self) -> np.ndarray:
        """[N] relevance that biases and stabilisers absorbed (negative: created) on the way down."""
        return self.initial.astype(np.float64) - self.input_sum

    @property
    def reach(self) -> np.ndarray:
        """[N] the share of the initial relevance (the explained logit) that reaches the input
        (NaN where the initial relevance is 0)."""
        return reach.shares(self.initial, self.input_sum, None)[0]

    @property
    def taken_shares(self) -> np.ndarray | None:
        """[N, F] what each family of ops took (lrp.reach.FAMILIES), as shares of the initial
        relevance; None for gradients."""
        if self.absorbed_by is None:
            return None
        return reach.shares(self.initial, self.input_sum, self.absorbed_by)[1]

    @property
    def taken(self) -> dict[str, np.ndarray] | None:
        """taken_shares by family: {"layer": [N] (biases and stabilisers), "activation": [N]
        (saturated activations), "other": [N]}."""
        shares = self.taken_shares
        return None if shares is None else {family: shares[:, k] for k, family in enumerate(reach.FAMILIES)}

    def reach_line(self, index: int) -> str:
        """'4.2 % reached the input; biases and stabilisers took 95.8 %' for image `index`."""
        shares = self.taken_shares
        return reach.describe(float(self.reach[index]), None if shares is None else shares[index])

    @property
    def conservation_error(self) -> np.ndarray:
        """[N] |input sum - initial relevance| / |initial relevance|."""
        return np.abs(self.absorbed) / np.maximum(np.abs(self.initial), 1e-30)

    def heatmap(self) -> np.ndarray:
        """[N, H, W]: the explainer's heatmap. Pixel maps (the default): the relevance summed over
        colour channels; layer and gated maps as the graph computed them."""
        if self.map is not None:
            return self.map
        return self.pixel_map()

    def pixel_map(self) -> np.ndarray:
        """[N, H, W] the input relevance summed over colour channels."""
        return self.relevance.sum(axis=1 if self.layout == "NCHW" else 3)

    def merge_report(self, index: int = 0) -> list[dict]:
        """Per merge: node, skip kind, and R, R_skip, R_main summed over image `index`."""
        return [
            {"node": m.node, "kind": m.kind, "R": float(s[0]), "R_skip": float(s[1]), "R_main": float(s[2])}
            for m, s in zip(self.merges, self.merge_sums[index])
        ]
