"""How much of the explained logit reaches the pixels, and where the rest went.

A conserving rule hands on all the relevance it receives; biases and stabilisers in the
layers' denominators, and activations whose gradient is zero where they saturate (ReLU6
above 6), take a share of it. On some deployed architectures (depthwise MobileNets,
EfficientNets) they take nearly all of it, and a heatmap drawn from the remainder still
looks like an explanation. The relevance graph reports, per image, what each family of ops
took (output ``absorbed``, one column per FAMILIES entry); this module reads it and says
in one line when too little arrived.
"""
from __future__ import annotations

import numpy as np

#: the families relevance can be lost to, as ops declare them (Op.loss_family), and how to say so
FAMILIES = ("layer", "activation", "other")
TOOK = {"layer": "biases and stabilisers", "activation": "saturated activations", "other": "other ops"}
#: the preset that hands on the stabilisers' share (where z+ denominators vanish)
CONSERVING = "epsilon-plus-flat-conserve"
#: explain and evaluate warn when the median share at the input is below this
WARN_BELOW = 0.10
_TINY = float(np.finfo(np.float32).tiny)


def shares(initial: np.ndarray, input_sum: np.ndarray, absorbed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Per image: the share of the initial relevance at the input, and [N, F] what each family took."""
    scale = np.where(np.abs(initial) > _TINY, initial.astype(np.float64), np.nan)
    at_input = input_sum.astype(np.float64) / scale
    return at_input, (None if absorbed is None else absorbed.astype(np.float64) / scale[:, None])


def describe(at_input: float, taken: np.ndarray | None) -> str:
    """'4.2 % reached the input; biases and stabilisers took 95.8 %' (shares of the initial relevance)."""
    text = f"{percent(at_input)} reached the input"
    if taken is not None:
        parts = [f"{TOOK[f]} took {percent(t)}" for f, t in zip(FAMILIES, taken) if abs(t) >= 0.0005]
        text += "; " + ", ".join(parts) if parts else ""
    return text


def percent(share: float) -> str:
    """72.4%, and small shares to two significant digits (0.0031%) rather than 0.0%."""
    return f"{share:.1%}" if abs(share) >= 0.001 or share == 0 else f"{share * 100:.2g}%"


def warning(at_input: np.ndarray, taken: np.ndarray | None, subject: str, advice: str | None = None,
            threshold: float = WARN_BELOW) -> str | None:
    """One line when the median share at the input is below `threshold`, else None. subject:
    what explained ("preset epsilon-plus-flat"); advice: what to do about it."""
    finite = np.isfinite(at_input)
    if not finite.any():
        return None
    median = float(np.median(at_input[finite]))
    if median >= threshold:
        return None
    where = np.median(taken[finite], axis=0) if taken is not None else None
    return (f"{subject}: only {describe(median, where)} (median over {int(finite.sum())} image(s)); the heatmap "
            f"is drawn from that remainder" + (f"; {advice}" if advice else ""))


def advice(bias: bool, taken: np.ndarray | None = None, preset: str | None = None) -> str:
    """What a user can do when too little arrived: without biases, the weights' share; where the
    stabilisers took it (z+ denominators that vanish), the preset that hands it on."""
    if bias:
        return "without biases (--no-bias) the rules hand on what the layers' weights carry"
    if preset != CONSERVING and taken is not None and np.nanmedian(taken[:, FAMILIES.index("layer")]) > 0.1:
        return f"--preset {CONSERVING} hands on what the stabilisers take"
    return "this preset's rules lose it on this architecture"
