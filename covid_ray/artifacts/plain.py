"""Plain Python values for the files stages write: one rule for ``torch.save``, one for JSON.

* :func:`torch_plain`: what a ``weights_only`` ``torch.load`` accepts (NaN stays a float:
  a checkpoint's metrics keep it);
* :func:`json_safe`: strict JSON (NaN and infinities become null, numpy scalars Python
  numbers), for every JSON file a stage writes with :func:`write_json`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def torch_plain(value: Any) -> Any:
    """Plain Python copy (NaN kept as float) so ``weights_only`` loading accepts it.

    Exact types only: ``np.float64`` subclasses ``float`` and ``np.str_`` subclasses
    ``str``, yet torch pickles them as numpy objects that a weights-only load refuses.
    """
    if isinstance(value, dict):
        return {str(k): torch_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [torch_plain(v) for v in value]
    if value is None or type(value) in (bool, int, float, str):
        return value
    if hasattr(value, "item"):
        return value.item()
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    return str(value)


def json_safe(value: Any) -> Any:
    """JSON-safe copy: NaN and infinities become null, numpy scalars Python numbers, keys strings."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (bool, int, float, str)) and getattr(value, "ndim", 0) == 0:
        value = value.item()  # a numpy scalar
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_text(value: Any) -> str:
    """``value`` as strict, indented JSON with a final newline (the layout of every JSON file here)."""
    return json.dumps(json_safe(value), indent=2, allow_nan=False) + "\n"


def write_json(path: str | Path, value: Any) -> Path:
    """Write :func:`json_text` of ``value`` to ``path``."""
    path = Path(path)
    path.write_text(json_text(value))
    return path
