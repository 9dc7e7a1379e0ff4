"""One seed mixer for every stream in lct_fast (data order, per-step training noise, sampling noise)."""

from __future__ import annotations

import hashlib
from typing import Union

import numpy as np

__all__ = ["derive_seed"]


def derive_seed(*parts: Union[int, str]) -> int:
    """A stable 63-bit seed from ints/strings (independent of PYTHONHASHSEED).

    Hashed with numpy's SeedSequence rather than bit-packed: torch's CPU generator keeps only the low 32 bits
    of a seed, and those are as well mixed as the rest here."""
    ints = []
    for p in parts:
        if isinstance(p, str):
            ints.append(int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "little"))
        else:
            ints.append(int(p) % (1 << 64))
    return int(np.random.SeedSequence(ints).generate_state(1, dtype=np.uint64)[0]) >> 1
