"""TOML text for the values tests put in the config files they write.

Inline tables and arrays only, which keeps the writer tiny: conftest.py's
service configs and test_config.py's random documents both go through it.
"""

from __future__ import annotations

import json
from typing import Any


def to_toml(value: Any) -> str:
    """``value`` as TOML: a bool, number, string, list, dict, date or time."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # inf and nan are spelt the same in TOML
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(to_toml(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{to_toml(k)} = {to_toml(v)}" for k, v in value.items()) + "}"
    return value.isoformat()  # dates and times
