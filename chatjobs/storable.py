"""JSON that Postgres will store and that reads back: what an upstream sent, made storable.

Python's json accepts NaN and Infinity, and strings with NUL or lone surrogates; JSONB refuses
all of them. An upstream's answer was paid for, so it is kept with those values replaced
(non-finite numbers become null, NUL and lone surrogates become U+FFFD) rather than lost.
"""

from __future__ import annotations

import math
import re
from typing import Any

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(value: Any) -> Any:
    """``value`` with every non-finite number and unstorable character replaced."""
    if isinstance(value, str):
        return _UNSTORABLE.sub("\ufffd", value) if _UNSTORABLE.search(value) else value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable(v) for v in value]
    return value
