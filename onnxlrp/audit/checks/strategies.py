"""Per predicted class: relevance in one small fixed region (Clever Hans), and heatmaps that fall
into separate strategies (SpRAy); both from audit.strategies on the downsized maps."""
from __future__ import annotations

from .base import Check, Observation, Outcome, register


@register
class CleverHans(Check):
    name, order, threshold, direction = "clever-hans", 80, 0.25, "above"
    summary = ("share of a class's relevance that sits in one small fixed region (outside the objects, where "
               "masks are given)")
    fails_by_default = True

    def run(self, data):
        found = data.strategies
        return Outcome({s.name: s.hans_score for s in found}, tuple(
            Observation(s.hans_score, f"class '{s.name}': {s.hans_score:.0%} of the relevance sits in one small "
                                      f"region ({s.region_area:.1%} of the image) across its images"
                                      f"{_carried(data, s.name)}", s.name,
                        tuple(data.names[i] for i in s.hans_images)) for s in found))


def _carried(data, name: str) -> str:
    """'; channels 31, 17 of <layer> carry it (66%, 65% of their relevance there)', where the
    concepts found them (audit.concepts)."""
    carried = data.concepts.hans.get(name, ()) if data.concepts is not None else ()
    if not carried:
        return ""
    channels = ", ".join(str(c) for c, _ in carried)
    shares = ", ".join(f"{s:.0%}" for _, s in carried)
    return f"; channels {channels} of {data.concepts.layer} carry it ({shares} of their relevance there)"


@register
class Strategies(Check):
    name, order, threshold, direction = "strategies", 90, 0.5, "above"
    summary = "eigengap of a class's heatmap affinity: clearly separate strategies"

    def run(self, data):
        found = data.strategies
        return Outcome({s.name: s.eigengap for s in found}, tuple(
            Observation(s.eigengap, f"class '{s.name}': its heatmaps fall into {len(s.clusters)} separate strategies "
                                    f"({', '.join(str(len(c)) for c in s.clusters)} images)", s.name,
                        tuple(data.names[c[0]] for c in s.clusters)) for s in found if len(s.clusters) > 1))
