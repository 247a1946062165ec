"""derive_seed: stable values (a change would change every run's metrics for the same seed)."""

from __future__ import annotations

from flair_fl.services.seeds import derive_seed


def test_derive_seed_is_pinned_and_63_bit() -> None:
    # Values of the implementation every recorded run used: changing them breaks "same seed,
    # same metrics" (and resumed runs would draw other users than before).
    assert derive_seed(0, "model-init") == 6793493344436649495
    assert derive_seed(7, "client", 3, "user-a", 1) == 2851087365901844847
    assert derive_seed(7, "client", 3, "user-a") != derive_seed(7, "client", 3, "user-a", 1)
    assert all(0 <= derive_seed(i, "x") < 2**63 for i in range(100))
