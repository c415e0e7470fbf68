"""Concepts: which channels of a layer a model's predictions rest on, and what they look at
(Concept Relevance Propagation; the conditional passes themselves are lrp.conditional).

    scan.py     the first pass over a folder: every image once, folded as it comes
    atlas.py    relevance maximisation: per class its top concepts, per concept its reference
                images with conditional maps cropped to where it looks
    report.py   the atlas as atlas.html (self-contained) and atlas.json

>>> from onnxlrp.concepts import atlas, write
>>> found = atlas("model.onnx", ["photos/"], layer="last")
>>> write(found, "atlas/")
"""
from .atlas import Atlas, ClassConcepts, Concept, Reference, atlas, explain_references, where_it_looks
from .report import FILES, write

__all__ = ["Atlas", "ClassConcepts", "Concept", "FILES", "Reference", "atlas", "explain_references", "where_it_looks",
           "write"]
