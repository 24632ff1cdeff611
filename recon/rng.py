"""Seeds derived from (key, seed): independent draws per scan, exact reproduction per job.

A cohort's mean +- std is over independent draws only if no two scans share one: the job seed
alone would give every scan the same noise field and mask. `derive_seed` mixes a stable hash of
a key (the scan id, with a purpose prefix) into numpy's SeedSequence, whose output streams are
statistically independent for distinct entropy (numpy docs, "Parallel random number generation").
"""
from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["derive_seed", "measurement_seed", "solver_seed"]


def derive_seed(key: str, seed: int) -> int:
    """A 63-bit seed from `key` and `seed`: the same pair always gives the same seed (no Python
    hash randomisation: SHA-256 of the key), different keys or seeds give independent ones."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    words = np.frombuffer(hashlib.sha256(str(key).encode("utf-8")).digest(), dtype="<u4")
    state = np.random.SeedSequence([int(seed), *(int(w) for w in words)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2 ** 63 - 1)


def measurement_seed(scan_id: str, seed: int) -> int:
    """The seed of a scan's simulated measurements (noise, masks, MRI phase and coil maps): the
    same for every solver of that scan and seed, so solver comparisons are paired."""
    return derive_seed(f"measurements/{scan_id}", seed)


def solver_seed(scan_id: str, seed: int) -> int:
    """The seed handed to the solver (input noise, network initialisation) for a scan and seed."""
    return derive_seed(f"solver/{scan_id}", seed)
