"""Verify a results store against the checksums its jobs recorded, and mark damaged jobs for rerun.

Every finished job (done, diverged) recorded, before its status, a digest of each chunk it wrote
(`pipeline.store.JobWriter`). `verify_store` reads them all back: a chunk that is missing, cannot
be decoded (garbage bytes, a truncated file) or decodes to other values names its job. A ledger
entry that cannot be decoded names its job too, whatever its status. `repair` marks those jobs
pending (attempts kept) so the next `dipcohort run` redoes exactly them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import store as st
from pipeline.jobs import FINISHED, STATUS_CODES


@dataclass(frozen=True)
class Damage:
    """One job whose data or ledger entry is missing or damaged."""

    row: int
    job_id: str
    label: str                     # scan/solver/seed
    problems: tuple[str, ...]      # one line per chunk: which chunk and what is wrong


@dataclass(frozen=True)
class Verification:
    checked: int                   # finished jobs whose data were read back
    damaged: list[Damage]


def verify_store(store_path: str | Path) -> Verification:
    """Read back every finished job's chunks and every ledger entry; list the damaged jobs."""
    root = st.open_store(store_path)
    coords = st.job_coords(root)
    ledger, ledger_damage = st.read_ledger(root)
    finished = {STATUS_CODES[s] for s in FINISHED}
    damaged, checked = [], 0
    for row in range(len(coords[st.JOB])):
        problems = list(ledger_damage.get(row, []))
        if int(ledger["status"][row]) in finished:
            checked += 1
            problems += _data_problems(root, row, coords, ledger["checksum"][row])
        if problems:
            label = f"{coords['scan_id'][row]}/{coords['solver'][row]}/seed{coords['seed'][row]}"
            damaged.append(Damage(row, str(coords[st.JOB][row]), label, tuple(problems)))
    return Verification(checked, damaged)


def _data_problems(root, row: int, coords, checksum: str) -> list[str]:
    sums = st.parse_checksum(checksum)
    if not sums:
        return [f"no checksum recorded for a finished job (chunk {st.chunk_name(root[st.JOBS]['checksum'], row)})"]
    parts = st.job_parts(root, row, str(coords["image_group"][row]), int(coords["image_index"][row]))
    out = []
    for part, expected in sorted(sums.items()):
        if part not in parts:
            out.append(f"{part}: recorded by the job but not in the store")
            continue
        arr, at = parts[part]
        why = st.part_problem(root, arr, at, expected)
        if why:
            out.append(why)
    return out


def repair(store_path: str | Path, damaged: list[Damage]) -> None:
    """Mark the damaged jobs pending (their attempts kept) so the next run redoes them; ledger
    chunks that cannot be decoded are first rewritten with their fill values (a column chunk
    holds LEDGER_BLOCK jobs: all of them, damaged too, are listed)."""
    if not damaged:
        return
    root = st.open_store(store_path, mode="r+")
    g = root[st.JOBS]
    rows = [d.row for d in damaged]
    _, bad = st.read_entries(g, rows)
    for row in bad:
        g[st.ENTRY][row] = ""
    for name in st.LEDGER:
        arr = g[name]
        _, bad = st.read_rows(arr, min(rows), max(rows) + 1)
        for a in sorted({row // arr.chunks[0] * arr.chunks[0] for row in set(bad) & set(rows)}):
            b = min(a + arr.chunks[0], arr.shape[0])
            arr[a:b] = np.full(b - a, "" if st.LEDGER[name] is str else arr.fill_value, dtype=object if
                               st.LEDGER[name] is str else arr.dtype)
    for d in damaged:
        st.mark(store_path, [d.row], "pending", error=f"verify: {'; '.join(d.problems)}")
