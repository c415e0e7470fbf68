"""Is the compiled explainer faithful to the model it explains? Rules for every op, the
model's own outputs, no NaN/Inf, relevance conserved where the rules promise it."""
from __future__ import annotations

import numpy as np

from ...lrp import reach
from .base import Check, Observation, Outcome, register


@register
class Rules(Check):
    name, order, threshold, direction = "rules", 10, 0, "above"
    summary = "ops without an LRP rule (the audit cannot explain the model)"
    fails_by_default = True
    needs = ()  # the one check that runs when nothing could be explained

    def run(self, data):
        if data.no_rule is None:
            return None
        return Outcome(1, (Observation(1.0, data.no_rule),))


@register
class Logits(Check):
    name, order, threshold, direction = "logits", 20, 1.0, "above"
    summary = ("largest difference between the explainer's logits (through the model's output activation) and "
               "the model's own output in the same arithmetic (onnxruntime, graph optimisations off: an int8 "
               "model's reference Q/DQ arithmetic), in units of what rounding allows: 1e-4 of the largest output, "
               "plus one quantisation step of an int8 model's output")
    fails_by_default = True

    def run(self, data):
        # Like with like: the relevance graph's logits, through the output activation the model ends
        # in (a field of the summary), against the model run in the same arithmetic (reference_session:
        # graph optimisations off, so an int8 model's reference Q/DQ arithmetic on any CPU).
        integrity = data.integrity
        step = integrity.step
        # allowed: float32 rounding, 1e-4 of the largest output (rounding of ~6e-8 relative per op, grown
        # over the layers' sums, stays far below); for an int8 output one quantisation step more: a
        # float32 rounding difference before the last QuantizeLinear can tip an x.5 tie the other way
        allowed = 1e-4 * integrity.largest_output + (step or 0.0)
        error = integrity.logit_difference / max(allowed, 1e-30)
        what = f"one quantisation step ({step:.3g})" if step and step >= allowed / 2 else "1e-4 of the largest output"
        return Outcome(error, (Observation(error, f"the explainer's logits differ from the model's own (reference "
                                                  f"arithmetic) by {integrity.logit_difference:.2e}, {error:.1f} x {what}"),))


@register
class DeployedKernels(Check):
    # Deployed int8 kernels requantise every layer with their own rounding (fixed-point vs float
    # multipliers, u8s8 saturation on AVX2): each can land one step off, and steps add up over the
    # layers, so a few output steps are expected; well beyond that the deployed model is not the
    # one whose arithmetic was explained and audited.
    name, order, threshold, direction = "deployed-kernels", 30, 4.0, "above"
    summary = ("largest difference between the model's output with onnxruntime's default optimisations (the "
               "deployed kernels: fused int8 kernels for a quantized model) and the reference arithmetic the "
               "audit explains, in output quantisation steps (int8 output) or 1e-4 of the largest output; "
               "informational, never failing")
    informational = True

    def run(self, data):
        # A separate, informational figure beside the logits gate, in output steps (int8) or 1e-4 of
        # the largest output.
        integrity, step = data.integrity, data.integrity.step
        difference = integrity.kernel_difference
        unit, per = (("output quantisation steps", step) if step else
                     ("1e-4 of the largest output", 1e-4 * integrity.largest_output))
        value = difference / max(per, 1e-30)
        deployed = {"max_difference": difference, "value": value, "unit": unit,
                    "reference": "onnxruntime, graph optimisations off (reference arithmetic)",
                    "deployed": "onnxruntime, default optimisations"}
        return Outcome(value, (Observation(value, f"onnxruntime's deployed kernels (default optimisations) give outputs "
                                                  f"{difference:.2e} ({value:.1f} {unit}) away from the reference "
                                                  "arithmetic the audit explains: the deployed model computes "
                                                  "something else than the one audited on this CPU"),),
                       detail=deployed)


@register
class Nonfinite(Check):
    name, order, threshold, direction = "nonfinite", 40, 0, "above"
    summary = "images whose relevance held NaN or Inf (set to 0, reported)"
    fails_by_default = True

    def run(self, data):
        exploded = [int(i) for i in np.flatnonzero(data.images.exploded)]
        return Outcome(len(exploded), (Observation(len(exploded), f"{len(exploded)} image(s) whose relevance exploded "
                                                                  "(NaN/Inf set to 0, or totals far beyond the initial "
                                                                  "relevance)", images=tuple(data.names[i] for i in exploded)),))


@register
class Conservation(Check):
    name, order, threshold, direction = "conservation", 60, 1e-3, "above"
    summary = ("largest conservation error where the rules promise conservation: at each residual merge, and "
               "from output to input without biases")
    fails_by_default = True

    def run(self, data):
        # Conservation as the rules promise it: every split hands on all it gets (R = R_skip + R_main,
        # per merge); the totals per image only where no bias absorbs relevance.
        if not data.conserving:
            return Outcome(None)
        bias, preset = data.options.bias, data.options.preset.name
        per_merge = data.images.merge_error
        promised = per_merge if bias else np.maximum(per_merge, data.images.conservation)
        worst = np.argsort(-promised)[:6]
        where = "at a residual merge" if bias else "between the output and the input, or at a merge"
        # without biases, what is still lost is the stabilisers' (z+ denominators that vanish)
        hint = f"; --preset {reach.CONSERVING} hands on what the stabilisers take" if not bias and preset != reach.CONSERVING else ""
        largest = float(promised.max())
        return Outcome(largest, (Observation(largest, f"relevance is not conserved {where}: off by up to "
                                                      f"{promised.max():.1%}{hint}",
                                             images=tuple(data.names[i] for i in worst)),))
