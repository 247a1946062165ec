"""Seeds for every random draw of a run, derived from `cfg.seed` and the draw's purpose.

User sampling, model init, client data order, augmentation, DP noise and injected faults
each seed their own generator with `derive_seed(cfg.seed, purpose, ...)`, so a draw does not
depend on how many draws came before it (a resumed run draws the same) and no two purposes
share a stream.
"""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 63-bit seed derived from any parts (stable across processes and Python runs)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
