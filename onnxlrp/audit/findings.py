"""Findings, the checks that produce them, their thresholds, and the verdict.

A finding is a check whose measured value crosses its threshold. Checks named in the
audit's fail-on set make it *fail* (severity "fail", exit 1); the others are reported as
"warning". ``--fail-on CHECK[=THRESHOLD]`` adds a check or moves its threshold.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import OnnxLrpError


@dataclass(frozen=True)
class Check:
    name: str
    threshold: float
    direction: str  # "above": a value above the threshold is a finding; "below": under it
    summary: str
    informational: bool = False  # reported (a warning above the threshold), never failing: not for --fail-on
    warn_at: float | None = None  # a second threshold, short of the first: crossing it is a warning


CHECKS: dict[str, Check] = {c.name: c for c in (
    Check("rules", 0, "above", "ops without an LRP rule (the audit cannot explain the model)"),
    Check("logits", 1.0, "above", "largest difference between the explainer's logits (through the model's "
                                 "output activation) and the model's own output in the same arithmetic "
                                 "(onnxruntime, graph optimisations off: an int8 model's reference Q/DQ "
                                 "arithmetic), in units of what rounding allows: 1e-4 of the largest output, "
                                 "plus one quantisation step of an int8 model's output"),
    # Deployed int8 kernels requantise every layer with their own rounding (fixed-point vs float
    # multipliers, u8s8 saturation on AVX2): each can land one step off, and steps add up over the
    # layers, so a few output steps are expected; well beyond that the deployed model is not the
    # one whose arithmetic was explained and audited.
    Check("deployed-kernels", 4.0, "above", "largest difference between the model's output with onnxruntime's "
                                           "default optimisations (the deployed kernels: fused int8 kernels for "
                                           "a quantized model) and the reference arithmetic the audit explains, "
                                           "in output quantisation steps (int8 output) or 1e-4 of the largest "
                                           "output; informational, never failing", informational=True),
    Check("nonfinite", 0, "above", "images whose relevance held NaN or Inf (set to 0, reported)"),
    # A heatmap drawn from 0.01 % of the logit still looks like one: below 1 % the explanations
    # say little about the model; below 10 % they are worth a look.
    Check("reach", 0.01, "below", "median share of the explained logit that reaches the input (the rest is "
                                  "taken by biases, stabilisers and saturated activations)", warn_at=0.10),
    Check("conservation", 1e-3, "above", "largest conservation error where the rules promise conservation: "
                                         "at each residual merge, and from output to input without biases"),
    Check("accuracy", 0.0, "below", "share of labelled images predicted right"),
    Check("clever-hans", 0.25, "above", "share of a class's relevance that sits in one small fixed region "
                                        "(outside the objects, where masks are given)"),
    Check("strategies", 0.5, "above", "eigengap of a class's heatmap affinity: clearly separate strategies"),
    Check("randomisation", 0.5, "above", "rank correlation of |heatmap| with that of the model with every "
                                         "layer's weights randomised (they must change)"),
    Check("random-logit", 0.9, "above", "rank correlation of |heatmap| for the predicted class and for a "
                                        "random other class (they must differ)"),
    Check("drift-agreement", 0.95, "below", "share of images the other model predicts alike"),
    Check("drift-explanation", 0.95, "below", "mean rank correlation of the two models' heatmaps"),
)}

#: what fails an audit unless --fail-on says otherwise
DEFAULT_FAIL_ON = ("rules", "logits", "nonfinite", "reach", "conservation", "clever-hans", "drift-agreement")
SEVERITIES = ("fail", "warning")


@dataclass(frozen=True)
class FailOn:
    """The checks that fail the audit, with their thresholds."""

    thresholds: tuple[tuple[str, float], ...]

    @classmethod
    def parse(cls, specs: list[str] | None) -> FailOn:
        """["clever-hans=0.3", "accuracy=0.9", ...]; None: the defaults. "none" fails on nothing."""
        if not specs:
            return cls(tuple((name, CHECKS[name].threshold) for name in DEFAULT_FAIL_ON))
        chosen: dict[str, float] = {}
        for spec in specs:
            for part in filter(None, (p.strip() for p in spec.split(","))):
                if part == "none":
                    continue
                name, _, value = part.partition("=")
                if name not in CHECKS:
                    raise OnnxLrpError(f"--fail-on: unknown check '{name}'; choose from "
                                       f"{', '.join(c.name for c in CHECKS.values() if not c.informational)}")
                if CHECKS[name].informational:
                    raise OnnxLrpError(f"--fail-on: '{name}' is informational (reported, never failing the audit)")
                try:
                    chosen[name] = float(value) if value else CHECKS[name].threshold
                except ValueError:
                    raise OnnxLrpError(f"--fail-on: '{value}' is not a number (in '{part}')") from None
        return cls(tuple(chosen.items()))

    def threshold(self, name: str) -> float:
        return dict(self.thresholds).get(name, CHECKS[name].threshold)

    def fails(self, name: str) -> bool:
        return name in dict(self.thresholds)


@dataclass
class Finding:
    check: str
    severity: str
    message: str
    value: float
    threshold: float
    class_: str | None = None  # the class it concerns, where there is one
    images: list[str] = field(default_factory=list)  # the images that support it

    def to_dict(self) -> dict:
        data = asdict(self)
        data["class"] = data.pop("class_")
        return data


def crosses(name: str, value: float, threshold: float) -> bool:
    return value > threshold if CHECKS[name].direction == "above" else value < threshold


def finding(fail_on: FailOn, name: str, value: float, message: str, class_: str | None = None,
            images: list[str] | None = None) -> Finding | None:
    """A finding where `value` crosses the check's threshold (or, a warning, its warn_at), else None."""
    threshold = fail_on.threshold(name)
    warn_at = CHECKS[name].warn_at
    if crosses(name, value, threshold):
        severity = "fail" if fail_on.fails(name) else "warning"
    elif warn_at is not None and crosses(name, value, warn_at):
        severity, threshold = "warning", warn_at
    else:
        return None
    return Finding(name, severity, message, float(value), float(threshold), class_, list(images or []))
