"""Command-line options shared by the diagnostics (``--name value`` pairs, the type of the default)."""
import sys


def arg(name, default):
    return type(default)(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


def keep_arg(default: float) -> float | int:
    """``--keep``: a fraction, or a token count (an integer above 1)."""
    value = arg("--keep", default)
    return int(value) if value > 1 and value == int(value) else value
