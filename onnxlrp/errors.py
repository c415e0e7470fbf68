"""The one exception type that users see."""


class OnnxLrpError(Exception):
    """A problem with the user's input, stated in one line.

    The message names what is wrong and where: the file, the node name, the op type,
    the shape. The CLI prints it as ``error: <message>`` and exits non-zero.
    """
