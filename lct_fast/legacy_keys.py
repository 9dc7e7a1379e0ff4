"""Parameter names written by older versions, mapped to today's, in one place: every loader of weights (the modules'
``load_state_dict``, :func:`lct_fast.weights.load_weights`, the EMA of a resumed run, ``launch/export.py``) reads old
checkpoints and exports through :func:`upgrade_key`. A leaf module."""
from __future__ import annotations

import re
from typing import Dict, TypeVar

__all__ = ["upgrade_key", "upgrade_keys"]

#: (old, new) name components. The guidance-scale embedding of an sCD student was ``g_embed`` before the
#: backbones embedded any extra condition by name (``<name>_embed``).
_RENAMES = (("g_embed", "guidance_embed"),)
_PATTERNS = [(re.compile(rf"(^|[./]){re.escape(old)}\."), rf"\g<1>{new}.") for old, new in _RENAMES]

V = TypeVar("V")


def upgrade_key(name: str) -> str:
    """Today's name of a parameter (or an ``<ema>/<parameter>`` entry) written by an older version."""
    for pattern, repl in _PATTERNS:
        name = pattern.sub(repl, name)
    return name


def upgrade_keys(state: Dict[str, V]) -> Dict[str, V]:
    return {upgrade_key(k): v for k, v in state.items()}
