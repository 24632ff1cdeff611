"""Compaction of the per-job data arrays: one file per job while jobs run, a few per 1,024 after.

A worker writes its job's rows of `metrics/values`, `summary/values` and the five arrays of its
image group, each row one chunk file of its own (no locks: no two jobs share a file). When a run
ends, the driver (holding the lease, no worker left) rebuilds each such array as a Zarr v3
*sharded* array: shards of LEDGER_BLOCK jobs, inner chunks of one job, so a reader of one job
still reads (and decodes) one inner chunk, and a finished cohort costs 7 files per 1,024 jobs
instead of 7 per job. Before a run whose jobs write rows of a compacted array, the driver
expands that array back to one chunk per job (a shard rewritten by two workers at once would
lose one's data), and a worker refuses to write into a sharded array (`pipeline.store.JobWriter`).

Each rebuild makes the new array in `STORE/.rebuild/<compact|expand>/<array path>` (a hidden
directory without zarr.json: zarr and xarray never list it), copies the rows, and only then
swaps it with the old one: one atomic exchange of the two directories (renameat2
RENAME_EXCHANGE; where the file system has none, two renames). The root's consolidated
metadata is dropped before the first swap (readers then read each array's own zarr.json, always
in step with its chunks) and rewritten after the last; `.rebuild` is removed last of all. A
process killed at any moment leaves every array whole under its name (in the two-rename
fallback: but for the instant between them) and `.rebuild` present, and the next driver run
`repair`s: a swap that happened is kept, a build that did not finish is discarded, and the
consolidated metadata is rewritten.

An array with a chunk that cannot be decoded is not compacted (it stays as it is and `verify`
names the chunk); one cannot be expanded for a run unless the damaged rows are among those the
run rewrites (`dipcohort verify --repair` marks their jobs pending): nothing is ever dropped.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import numpy as np
import zarr

from pipeline import store as st
from pipeline.jobs import Job

STAGING = ".rebuild"               # STORE/.rebuild/<direction>/<array path>: arrays being rebuilt
COMPACT, EXPAND = "compact", "expand"
OLD = ".old"                       # the two-rename fallback: the old array, moved aside
COPY_BYTES = 256 * 2**20           # rows copied at a time: at most this much (a shard of MRI images is more)


def data_arrays(root: zarr.Group) -> list[str]:
    """The store paths of the arrays workers write, one row per job."""
    names = [f"{st.METRICS}/{st.VALUES}", f"{st.SUMMARY}/{st.VALUES}"]
    for group in root[st.IMAGES].group_keys():
        names += [f"{st.IMAGES}/{group}/{name}" for name in st.IMAGE_ARRAYS]
    return names


def is_sharded(arr: zarr.Array) -> bool:
    return arr.shards is not None


def compact_store(path: str | Path, stream=None) -> list[str]:
    """Rebuild every per-job-chunked data array as a sharded one; returns the arrays rebuilt.
    An array with an undecodable chunk is left as it is (one line on `stream` names it)."""
    path, stream = Path(path), stream or sys.stderr
    repair(path, stream)                           # a rebuild a killed process left, first
    root = st.open_store(path)
    names = [name for name in data_arrays(root) if not is_sharded(root[name]) and root[name].shape[0]]
    done = []
    with _staging(path, COMPACT) as built:
        for name in names:
            try:
                build(path, name, COMPACT)
            except Undecodable as err:
                print(f"warning: {path}/{name} not compacted: {err}; `dipcohort verify {path}` names their jobs",
                      file=stream)
                shutil.rmtree(staged(path, name, COMPACT))
                continue
            done.append(name)
        built.extend(done)
    return done


def expand_for(path: str | Path, jobs: Sequence[Job]) -> list[str]:
    """Make every compacted array that `jobs` write one chunk per job again (before any of
    them runs); returns the arrays rebuilt. StoreError, changing nothing, when one holds an
    undecodable shard with rows of jobs this run does not redo (expanding would drop them)."""
    path = Path(path)
    repair(path)
    root = st.open_store(path)
    todo = {name: rows for name, rows in _rows_written(root, jobs).items() if is_sharded(root[name])}
    with _staging(path, EXPAND) as built:
        for name, rows in todo.items():
            try:
                build(path, name, EXPAND, rewritten=rows)
            except Undecodable as err:
                raise st.StoreError(f"{path}: {name} cannot be expanded for this run: {err}, of jobs it does not "
                                    f"redo; run `dipcohort verify {path} --repair` (it marks them pending), then "
                                    f"run again") from None
        built.extend(todo)
    return list(todo)


class Undecodable(Exception):
    """A source row that cannot be decoded (the message names its file) and would be lost."""


def _rows_written(root: zarr.Group, jobs: Sequence[Job]) -> dict[str, set[int]]:
    """Array path → the rows `jobs` write in it (as `pipeline.store.job_parts` places them;
    computed from the jobs alone: a zarr lookup per job costs ~3 s per 1,000 jobs)."""
    if not jobs:
        return {}
    rows = {job.index for job in jobs}
    out = {f"{st.METRICS}/{st.VALUES}": rows, f"{st.SUMMARY}/{st.VALUES}": rows}
    groups = set(root[st.IMAGES].group_keys())
    for job in jobs:
        if job.image_group in groups:
            for name in st.IMAGE_ARRAYS:
                out.setdefault(f"{st.IMAGES}/{job.image_group}/{name}", set()).add(job.image_index)
    return out


# ---------------------------------------------------------------------------------------------
# rebuilding: build beside, swap, tidy; every step leaves a store `repair` understands
# ---------------------------------------------------------------------------------------------
@contextmanager
def _staging(path: Path, direction: str):
    """Yields a list to fill with the arrays built in staging; then swaps them in, rewrites
    the consolidated metadata and removes staging. An exception discards what was built."""
    (path / STAGING).mkdir()                       # before any build: `repair` then knows to look
    built: list[str] = []
    try:
        yield built
    except BaseException:
        shutil.rmtree(path / STAGING, ignore_errors=True)   # nothing swapped yet: the arrays are as before
        raise
    if built:
        drop_consolidated(path)        # from here readers take each array's own zarr.json
        for name in built:
            swap(path, name, direction)
        st.consolidate(path)
    shutil.rmtree(path / STAGING)      # last: its absence says that all of the above is complete


def staged(path: Path, name: str, direction: str) -> Path:
    return path / STAGING / direction / name


def build(path: Path, name: str, direction: str, rewritten: set[int] = frozenset()) -> None:
    """The array `name` rebuilt in its staging directory: sharded (compact) or one chunk per
    job (expand). Undecodable when a source row cannot be decoded, unless it is `rewritten`."""
    src = zarr.open_array(str(path / name), mode="r")
    target = staged(path, name, direction)
    target.parent.mkdir(parents=True, exist_ok=True)
    n, rest = src.shape[0], tuple(src.shape[1:])
    shards = (min(st.LEDGER_BLOCK, n), *rest) if direction == COMPACT else None
    dst = zarr.create_array(str(target), shape=src.shape, chunks=(1, *rest), shards=shards, dtype=src.dtype,
                            fill_value=src.fill_value, dimension_names=src.metadata.dimension_names,
                            attributes=dict(src.attrs))
    write = _job_chunk_writer(dst) or dst.__setitem__
    for a, b in _copy_blocks(dst):
        values, bad = st.read_rows(src, a, b)
        lost = {row: why for row, why in bad.items() if row not in rewritten}
        if lost:
            row, why = next(iter(lost.items()))
            raise Undecodable(f"{len(lost)} row(s) cannot be decoded (row {row}: {why})")
        write(slice(a, b), values)


def _job_chunk_writer(dst: zarr.Array):
    """For an array of one chunk per job in the layout `pipeline.store._job_chunk_codecs` reads,
    a writer of rows that encodes each chunk file itself with the codecs zarr would call (~2 ms
    a chunk through zarr, ~0.1 ms here: an expansion writes one file per job and array); None
    for any other array (zarr writes it). Rows equal to the fill value are not written, as zarr
    does not write them."""
    from numcodecs import Zstd

    codecs = st._job_chunk_codecs(dst)
    if codecs is None or codecs[0] != "numbers" or dst.metadata.codecs[1].level != 0:
        return None
    zstd, dtype = Zstd(level=0), codecs[1]
    folder = Path(str(dst.store.root)) / dst.path
    tail = (0,) * (dst.ndim - 1)

    def write(rows: slice, values) -> None:
        for k, row in enumerate(range(rows.start, rows.stop)):
            value = values[k]
            if np.array_equal(value, np.full_like(value, dst.fill_value), equal_nan=dst.dtype.kind == "f"):
                continue
            path = folder / dst.metadata.encode_chunk_key((row,) + tail)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(zstd.encode(np.ascontiguousarray(value, dtype=dtype).tobytes()))
    return write


def _copy_blocks(arr: zarr.Array) -> list[tuple[int, int]]:
    """Row ranges to copy or check at a time: whole shards (whole blocks of LEDGER_BLOCK rows)
    unless that is more than COPY_BYTES."""
    n = arr.shape[0]
    row_bytes = max(1, arr.nbytes // max(n, 1))
    step = max(1, min(st.LEDGER_BLOCK, COPY_BYTES // row_bytes))
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def swap(path: Path, name: str, direction: str) -> None:
    """Put the built array under `name`; the old one is removed (it is last in staging)."""
    new, live = staged(path, name, direction), path / name
    if not _exchange(new, live):
        os.rename(live, new.with_name(new.name + OLD))   # the fallback: `name` is absent until the next line
        os.rename(new, live)
        new = new.with_name(new.name + OLD)
    shutil.rmtree(new)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def drop_consolidated(path: Path) -> None:
    """Remove the consolidated metadata from the root zarr.json (replaced atomically)."""
    meta = path / "zarr.json"
    doc = json.loads(meta.read_text())
    if doc.pop("consolidated_metadata", None) is None:
        return
    tmp = meta.with_name(f"zarr.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, meta)


# ---------------------------------------------------------------------------------------------
# repair (driver, holding the lease, before anything else)
# ---------------------------------------------------------------------------------------------
def repair(path: str | Path, stream=None) -> list[str]:
    """Finish or discard the rebuilds a killed driver left; returns one line per array touched."""
    path = Path(path)
    if not (path / STAGING).is_dir():
        return []
    lines = []
    for direction in (COMPACT, EXPAND):
        for name in _staged_names(path, direction):
            lines.append(f"{name}: {_repair_one(path, name, direction)}")
    st.consolidate(path)
    shutil.rmtree(path / STAGING)
    for line in lines:
        print(f"repaired an interrupted {STAGING[1:]} of {path}: {line}", file=stream or sys.stderr)
    return lines


def missing_arrays(path: Path, root: zarr.Group) -> list[str]:
    """The data arrays absent from the store: only ever those the two-rename fallback was
    swapping when its process was killed (cheap when nothing was: one stat)."""
    if not (path / STAGING).is_dir():
        return []
    return [name for name in data_arrays(root) if not (path / name / "zarr.json").is_file()]


def _staged_names(path: Path, direction: str) -> list[str]:
    """The array paths with something in staging (a build, or an old array moved aside)."""
    base = path / STAGING / direction
    names = set()
    for meta in base.rglob("zarr.json"):
        rel = meta.parent.relative_to(base).as_posix()
        names.add(rel[: -len(OLD)] if rel.endswith(OLD) else rel)
    # what has no zarr.json (a removal killed midway) is removed with the staging directory
    return sorted(names)


def _repair_one(path: Path, name: str, direction: str) -> str:
    new, live = staged(path, name, direction), path / name
    old = new.with_name(new.name + OLD)
    if not live.exists() and new.exists():       # the fallback, killed between its two renames
        os.rename(new, live)
        shutil.rmtree(old, ignore_errors=True)
        return "swap completed"
    shutil.rmtree(old, ignore_errors=True)
    swapped = _sharded_on_disk(live) == (direction == COMPACT)
    shutil.rmtree(new, ignore_errors=True)
    return "swap kept, old copy removed" if swapped else "unfinished rebuild discarded (the array is as before)"


def _sharded_on_disk(folder: Path) -> bool:
    codecs = json.loads((folder / "zarr.json").read_text()).get("codecs", [])
    return bool(codecs) and codecs[0].get("name") == "sharding_indexed"
