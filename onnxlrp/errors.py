"""The one exception type that users see, and the one warning category."""


class OnnxLrpError(Exception):
    """A problem with the user's input, stated in one line.

    The message names what is wrong and where: the file, the node name, the op type,
    the shape. The CLI prints it as ``error: <message>`` and exits non-zero.
    """


class NoRuleError(OnnxLrpError):
    """A node of the graph that no LRP rule applies to: an op type without an adapter, an
    adapter that cannot take the node as it is, a preset or rule that does not fit it. The
    audit reports these as its `rules` check instead of stopping."""


class OnnxLrpWarning(UserWarning):
    """The explanation is computed, but not quite as asked (e.g. ``paper`` on a BN-folded graph,
    relevance that exploded, a cache that cannot be written)."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception message, for one-line errors."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
