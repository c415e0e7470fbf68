"""The exceptions users see, one subclass of OnnxLrpError per kind of problem, and the one
warning category. Code that must tell kinds apart reads the type, never the message."""


class OnnxLrpError(Exception):
    """A problem with the user's input, stated in one line.

    The message names what is wrong and where: the file, the node name, the op type,
    the shape. The CLI prints it as ``error: <message>`` and exits non-zero.
    """


class NoRuleError(OnnxLrpError):
    """A node of the graph that no LRP rule applies to: an op type without an adapter, an
    adapter that cannot take the node as it is, a preset or rule that does not fit it. The
    audit reports these as its `rules` check instead of stopping."""


class ModelError(OnnxLrpError):
    """The model file: unreadable, invalid, or a graph onnxlrp cannot take as it is (shapes,
    opsets, computed weights)."""


class ImageError(OnnxLrpError):
    """An image file or folder: missing, unreadable, or no images in it."""


class DataError(OnnxLrpError):
    """A dataset's labels, masks or layout (evaluate, audit)."""


class SettingError(OnnxLrpError):
    """A setting's value: an unknown preset, split, device or precision, a bad bound, a rule
    override that names nothing."""


class OutputError(OnnxLrpError):
    """A destination that cannot be written, or output files that disagree with the run."""


class ClusterError(OnnxLrpError):
    """Ray: not installed, no cluster at the address, or an actor that failed."""


class OnnxLrpWarning(UserWarning):
    """The explanation is computed, but not quite as asked (e.g. ``paper`` on a BN-folded graph,
    relevance that exploded, a cache that cannot be written)."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception message, for one-line errors."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
