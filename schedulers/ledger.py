"""What the backends read and write of the store's ledger: re-exported from `pipeline.store`,
which owns the ledger's schema (a backend writes the ledger only for a job whose process died
before the worker could record anything, and reads it to follow jobs it cannot watch directly)."""
from __future__ import annotations

from pipeline.store import ENDED, Snapshot, ended_since, mark, record_lost, snapshot, started_since

__all__ = ["ENDED", "Snapshot", "ended_since", "mark", "record_lost", "snapshot", "started_since"]
