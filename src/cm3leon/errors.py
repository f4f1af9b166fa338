"""The one error type for bad or missing user input (see `cm3leon.cli` for how it is reported)."""


class UsageError(Exception):
    """Bad or missing input: a missing path, a bad value, an unreadable file.

    The message is one line naming the thing and the fix ("checkpoint X not found: pass ckpt=PATH
    ..."). Entry scripts report it without a traceback and exit with code 2; a real crash keeps its
    traceback.
    """
