"""Small helpers shared by several modules."""

import importlib.util
import re
from types import ModuleType

from mlalm.errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def load_script(path: str, name: str) -> ModuleType:
    """A script (``scripts/compare.py``, not a package module) loaded as module ``name``,
    for a script or test that reuses its functions."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def round_up(n: int, m: int) -> int:
    """The smallest multiple of ``m`` that is >= ``n`` (n >= 0, m >= 1)."""
    return -(-n // m) * m


def parse_size(value, *, key: str = "max_memory") -> int:
    """``'2GB'`` -> 2·10^9, ``'512MiB'`` -> 512·2^20, ``1000`` or ``'1000'`` -> 1000 bytes.

    Raises:
        ConfigError: not a positive size; the message names ``key``.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value > 0:
            return value
        m = None
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS or float(m.group(1)) * _UNITS[unit] < 1:
        raise ConfigError(
            f"{key}={value!r}: expected a positive size such as 2GB, 512MiB or "
            f"1073741824 (units: B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    return int(float(m.group(1)) * _UNITS[unit])
