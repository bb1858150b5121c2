"""Small helpers shared by several modules."""


def round_up(n: int, m: int) -> int:
    """The smallest multiple of ``m`` that is >= ``n`` (n >= 0, m >= 1)."""
    return -(-n // m) * m
