"""Cohort manifests: YAML → validated `Manifest` → jobs (scans × solver configs × seeds).

A manifest (see manifests/demo.yaml) names a cohort, its scans and the solvers to run:

    cohort: demo
    steps: 300                 # per solver overridable; default: the solver's own budget
    seeds: [0]
    size: 32                   # default resize of natural images (pixels, square)
    metrics: {ssim_every: 10}
    resources: {gpus: 0, cpus: 1, mem_gb: 2, time_min: 10}   # pack: N or auto (jobs run together)
    checkpoint_every: 0
    scans:
      - {id: camera-dn25, source: "skimage:camera", task: denoise, params: {sigma: 25}}
      - sources: {camera: "skimage:camera", moon: "skimage:moon"}   # many images, one task
        id: "{id}-inpaint"                                          # id template
        task: inpaint
        params: {hole_ratio: 0.1}
      - csv: scans.csv          # columns id, source, task [, kind, reference, size] + task params
      - glob: "${FASTMRI_DIR:-data}/*.h5"   # id = file stem (template "{stem}")
        slice: 18
        task: mri
        kind: measured
        params: {acceleration: 4}
    solvers:
      - {name: dip, params: {network: skip-small}}
      - {name: aseqdip, params: {lambda: [0.5, 1, 2]}}     # a list expands into a grid

Relative paths are relative to the manifest's directory; `${VAR}` and `${VAR:-default}` are
expanded from the environment in source / reference / csv / glob so users point studies at
their data without editing them. Every error names the file, the field path (or the CSV row)
and what was expected.
"""
from __future__ import annotations

import csv
import glob as globlib
import itertools
import os
import re
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, \
    PositiveInt, ValidationError, model_validator

from pipeline.errors import UsageError
from pipeline.io import PACKAGE_SOURCES
from pipeline.jobs import Job, Resources, ScanSpec, canonical_json, config_id_for, job_id_for

Scalar = Union[bool, int, float, str, None]


class ManifestError(UsageError):
    """An invalid manifest; the message names file, field (or CSV row) and what was expected."""


# ---------------------------------------------------------------------------------------------
# schema (pydantic): shape and types of the YAML document
# ---------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ResourcesModel(_Strict):
    gpus: NonNegativeFloat = 0.0
    cpus: PositiveInt = 1
    mem_gb: PositiveFloat = 4.0
    time_min: PositiveFloat = 60.0
    pack: Union[PositiveInt, Literal["auto"]] = 1  # jobs run together (pipeline.packing); --pack overrides


class MetricsModel(_Strict):
    ssim_every: NonNegativeInt = 10  # SSIM is ~10x the cost of PSNR (recon.solvers.loop)


class SolverModel(_Strict):
    name: str
    params: dict[str, Union[Scalar, list[Any]]] = Field(default_factory=dict)
    steps: PositiveInt | None = None
    seeds: list[NonNegativeInt] | NonNegativeInt | None = None
    resources: dict[str, Any] = Field(default_factory=dict)
    checkpoint_every: NonNegativeInt | None = None


class ScanEntryModel(_Strict):
    id: str | None = None
    source: str | None = None
    sources: dict[str, str] | None = None
    csv: str | None = None
    glob: str | None = None
    slice: NonNegativeInt | None = None
    task: str | None = None
    params: dict[str, Scalar] = Field(default_factory=dict)
    kind: Literal["simulate", "measured"] = "simulate"
    reference: str | None = None
    size: PositiveInt | None = None
    color: bool = False
    # a study's subsets: run only these of the manifest's solvers (by name) on these scans, and/or
    # these seeds instead of the solvers' own (e.g. FBP only on CT, a second seed on one image)
    solvers: list[str] | None = None
    seeds: list[NonNegativeInt] | NonNegativeInt | None = None

    @model_validator(mode="after")
    def _one_origin(self) -> "ScanEntryModel":
        given = [k for k in ("source", "sources", "csv", "glob") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("expected exactly one of 'source', 'sources', 'csv' or 'glob'"
                             + (f", got {', '.join(given)}" if given else ""))
        if self.source is not None and self.id is None:
            raise ValueError("a scan with 'source' needs an 'id'")
        if self.slice is not None and self.glob is None:
            raise ValueError("'slice' applies to 'glob' entries (HDF5 files); write FILE.h5#slice=K in 'source'")
        return self


class ManifestModel(_Strict):
    cohort: str = Field(min_length=1)
    description: str = ""
    steps: PositiveInt | None = None
    seeds: list[NonNegativeInt] | NonNegativeInt = Field(default_factory=lambda: [0])
    size: PositiveInt | None = None
    metrics: MetricsModel = Field(default_factory=MetricsModel)
    resources: ResourcesModel = Field(default_factory=ResourcesModel)
    checkpoint_every: NonNegativeInt = 0
    scans: list[ScanEntryModel] = Field(min_length=1)
    solvers: list[SolverModel] = Field(min_length=1)
    # scans kept apart for choosing hyper-parameters (`dipcohort tune`); `run` never evaluates them
    tuning_scans: list[ScanEntryModel] = Field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# the validated manifest
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SolverConfig:
    """One point of a solver's grid: canonical params (aliases resolved, values coerced)."""

    solver: str
    params: dict
    steps: int
    seeds: tuple[int, ...]
    resources: Resources
    checkpoint_every: int
    where: str  # field path, for messages

    @property
    def config(self) -> str:
        return config_id_for(self.solver, {"params": self.params, "steps": self.steps})

    @property
    def label(self) -> str:
        inner = ", ".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.solver}({inner})" if inner else self.solver


@dataclass
class Manifest:
    path: Path
    text: str
    cohort: str
    scans: list[ScanSpec]
    configs: list[SolverConfig]
    ssim_every: int
    description: str = ""
    jobs: list[Job] = field(default_factory=list)
    tuning_scans: list[ScanSpec] = field(default_factory=list)
    seeds: tuple[int, ...] = (0,)
    # scan id -> (solver names or None for all, seeds or None for each solver's own)
    scan_plans: dict[str, tuple[frozenset[str] | None, tuple[int, ...] | None]] = field(default_factory=dict)


def load_manifest(path: str | Path) -> Manifest:
    """Read, validate and expand a manifest file; raise ManifestError naming what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest file")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ManifestError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a mapping with keys cohort, scans, solvers; got {type(data).__name__}")
    try:
        model = ManifestModel.model_validate(data)
    except ValidationError as err:
        raise ManifestError(_format_errors(path, err)) from None
    base = path.resolve().parent
    plans: dict = {}
    scans = _expand_scans(model.scans, model, path, base, plans=plans)
    tuning = _expand_scans(model.tuning_scans, model, path, base, field="tuning_scans")
    clash = sorted({s.id for s in scans} & {s.id for s in tuning})
    if clash:
        raise ManifestError(f"{path}: scan id(s) {', '.join(clash)} appear in both scans and tuning_scans; "
                            f"expected distinct ids")
    configs = _expand_solvers(model, path)
    manifest = Manifest(path=path, text=text, cohort=model.cohort, scans=scans, configs=configs,
                        ssim_every=model.metrics.ssim_every, description=model.description, tuning_scans=tuning,
                        seeds=_seeds(model.seeds), scan_plans=plans)
    manifest.jobs = expand_jobs(manifest)
    return manifest


def _format_errors(path: Path, err: ValidationError) -> str:
    # a union field reports one error per alternative: merge them into one line per field
    grouped: dict[str, tuple[list[str], str]] = {}
    for e in err.errors():
        where = _loc(e["loc"]) or "(top level)"
        got = "" if e["type"] == "missing" else f" (got {e.get('input')!r})"
        msgs, _ = grouped.setdefault(where, ([], got))
        msg = e["msg"].removeprefix("Value error, ")
        if msg not in msgs:
            msgs.append(msg)
    lines = [f"{path}: invalid manifest ({len(grouped)} error(s)):"]
    lines += [f"  {where}: {_join(msgs)}{got}" for where, (msgs, got) in grouped.items()]
    return "\n".join(lines)


def _join(msgs: list[str]) -> str:
    head = "Input should be "
    if len(msgs) > 1 and all(m.startswith(head) for m in msgs):
        return head + " or ".join(m[len(head):] for m in msgs)
    return "; ".join(msgs)


_TAGS = {"bool", "int", "float", "str", "none", "constrained-int", "constrained-float", "constrained-str"}
_TAG_PREFIXES = ("list[", "dict[", "function-", "union[", "tagged-union[", "literal[", "nullable[")


def _loc(loc: tuple) -> str:
    """('scans', 2, 'params', 'sigma', 'float') -> 'scans[2].params.sigma' (drops pydantic's union tags)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _TAGS or str(part).startswith(_TAG_PREFIXES):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


# ---------------------------------------------------------------------------------------------
# scans
# ---------------------------------------------------------------------------------------------
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: str, where: str) -> str:
    def repl(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ManifestError(f"{where}: environment variable {name} is not set (write ${{{name}:-default}} "
                            f"for a default)")
    return _ENV.sub(repl, value)


def _resolve(value: str, base: Path, where: str) -> str:
    """Expand ${VAR}; make a relative file path absolute against the manifest's directory."""
    value = _expand_env(value, where)
    if value.startswith(PACKAGE_SOURCES):
        return value
    file, sep, fragment = value.partition("#")  # FILE.h5#slice=K
    p = Path(file).expanduser()
    return str(p if p.is_absolute() else base / p) + sep + fragment


def check_scan_id(scan_id: str, where: str) -> None:
    """Scan ids become store keys and file names: no separators, no '..', not blank."""
    if not isinstance(scan_id, str) or not scan_id.strip():
        raise ManifestError(f"{where}: scan id is empty; expected a short name such as 'knee-001'")
    bad = [c for c in ("/", "\\", "\0") if c in scan_id]
    if bad or ".." in scan_id or scan_id != scan_id.strip() or any(ord(c) < 32 for c in scan_id):
        raise ManifestError(f"{where}: unsafe scan id {scan_id!r}; expected no path separators, no '..', "
                            f"no control characters and no leading/trailing whitespace")


def _expand_scans(entries: list[ScanEntryModel], model: ManifestModel, path: Path, base: Path,
                  field: str = "scans", plans: dict | None = None) -> list[ScanSpec]:
    from recon.tasks import TASKS

    scans: list[ScanSpec] = []
    origin: dict[str, str] = {}
    for i, entry in enumerate(entries):
        where = f"{path}: {field}[{i}]"
        plan = _entry_plan(entry, model, where)
        for spec, spec_where in _entry_scans(entry, model, where, base):
            if plans is not None and plan != (None, None):
                plans[spec.id] = plan
            if spec.task not in TASKS:
                raise ManifestError(f"{spec_where}: task {spec.task!r} is not one of {', '.join(TASKS)}")
            _check_task_params(spec, spec_where)
            check_scan_id(spec.id, spec_where)
            if spec.id in origin:
                raise ManifestError(f"{spec_where}: duplicate scan id {spec.id!r} (first at {origin[spec.id]}); "
                                    f"scan ids must be unique (use an id template such as '{{id}}-4x')")
            origin[spec.id] = spec_where
            scans.append(spec)
    return scans


def _entry_plan(entry: ScanEntryModel, model: ManifestModel, where: str):
    """(solver names, seeds) an entry restricts its scans to; (None, None) when it does not."""
    names = None
    if entry.solvers is not None:
        known = [s.name for s in model.solvers]
        unknown = [n for n in entry.solvers if n not in known]
        if unknown or not entry.solvers:
            raise ManifestError(f"{where}.solvers: {', '.join(map(repr, unknown)) or 'empty list'}; expected "
                                f"names of the manifest's solvers ({', '.join(dict.fromkeys(known))})")
        names = frozenset(entry.solvers)
    seeds = _seeds(entry.seeds) if entry.seeds is not None else None
    return names, seeds


def _check_task_params(spec: ScanSpec, where: str) -> None:
    """Parameter names against the task's own tables (recon.tasks); values are checked when a job
    builds its problem (recon.tasks.check_params could check them here, nothing built)."""
    from recon.tasks import parameter_names

    try:
        names = parameter_names(spec.task, spec.kind)
    except ValueError as err:
        raise ManifestError(f"{where}: {err}") from None
    unknown = sorted(set(spec.task_params) - set(names))
    if unknown:
        raise ManifestError(f"{where}.params: unknown parameter(s) {', '.join(unknown)} for task {spec.task!r} "
                            f"({spec.kind}); expected any of {', '.join(sorted(names))}")


def _entry_scans(entry: ScanEntryModel, model: ManifestModel, where: str, base: Path):
    """Yield (ScanSpec, where) for one `scans[i]` entry."""
    size = entry.size if entry.size is not None else model.size
    ref = _resolve(entry.reference, base, f"{where}.reference") if entry.reference else None

    def make(scan_id: str, source: str, task: str | None, params: dict, w: str, kind: str = entry.kind,
             reference: str | None = ref, scan_size: int | None = size) -> tuple[ScanSpec, str]:
        if not task:
            raise ManifestError(f"{w}: missing task; expected one of denoise, inpaint, deblur, sr, mri, ct")
        return ScanSpec(id=scan_id, source=source, task=task, task_params=dict(params), kind=kind,
                        reference=reference, size=scan_size, color=entry.color), w

    if entry.source is not None:
        yield make(entry.id, _resolve(entry.source, base, f"{where}.source"), entry.task, entry.params, where)
    elif entry.sources is not None:
        template = entry.id or "{id}"
        for key, src in entry.sources.items():
            w = f"{where}.sources.{key}"
            yield make(_format_id(template, w, id=key), _resolve(src, base, w), entry.task, entry.params, w)
    elif entry.glob is not None:
        pattern = _resolve(entry.glob, base, f"{where}.glob")
        matches = sorted(globlib.glob(pattern, recursive=True))
        if not matches:
            raise ManifestError(f"{where}.glob: pattern {pattern!r} matches no files; expected at least one "
                                f"(edit the path or set the environment variable it names)")
        template = entry.id or "{stem}"
        frag = f"#slice={entry.slice}" if entry.slice is not None else ""
        for m in matches:
            stem = Path(m).name.split(".")[0]
            yield make(_format_id(template, f"{where}.id", stem=stem, id=stem), m + frag, entry.task,
                       entry.params, f"{where}.glob ({Path(m).name})")
    else:
        yield from _csv_scans(entry, model, where, base, make)


def _format_id(template: str, where: str, **fields_: str) -> str:
    try:
        return template.format(**fields_)
    except (KeyError, IndexError, ValueError) as err:
        raise ManifestError(f"{where}: bad id template {template!r}: {err}; expected fields "
                            f"{', '.join('{' + k + '}' for k in fields_)}") from None


_CSV_FIELDS = ("id", "source", "task", "kind", "reference", "size")


def _csv_scans(entry: ScanEntryModel, model: ManifestModel, where: str, base: Path, make):
    csv_path = Path(_resolve(entry.csv, base, f"{where}.csv"))
    if not csv_path.is_file():
        raise ManifestError(f"{where}.csv: no such file {csv_path}")
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        missing = [c for c in ("id", "source") if c not in columns]
        if missing:
            raise ManifestError(f"{where}.csv: {csv_path}: missing column(s) {', '.join(missing)}; expected a header with "
                                f"id, source[, task, kind, reference, size] and task parameters")
        template = entry.id or "{id}"
        for row_no, row in enumerate(reader, start=1):
            w = f"{where}.csv: {csv_path}, row {row_no} (line {reader.line_num})"
            if None in row:
                raise ManifestError(f"{w}: more cells than the {len(columns)} columns of the header")
            raw_id = (row.get("id") or "")
            check_scan_id(raw_id, f"{w}, column id")
            source = (row.get("source") or "").strip()
            if not source:
                raise ManifestError(f"{w}, column source: empty; expected an image or data file")
            params = dict(entry.params)
            params.update({k: _cell(v) for k, v in row.items() if k not in _CSV_FIELDS and v not in (None, "")})
            kind = (row.get("kind") or entry.kind).strip()
            if kind not in ("simulate", "measured"):
                raise ManifestError(f"{w}, column kind: expected 'simulate' or 'measured', got {kind!r}")
            ref = row.get("reference") or None
            size = _cell(row["size"]) if row.get("size") else (entry.size if entry.size is not None else model.size)
            if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
                raise ManifestError(f"{w}, column size: expected a positive integer, got {row.get('size')!r}")
            yield make(_format_id(template, f"{where}.id", id=raw_id), _resolve(source, base, f"{w}, column source"),
                       (row.get("task") or entry.task or "").strip(), params, w, kind=kind,
                       reference=_resolve(ref, base, f"{w}, column reference") if ref else None, scan_size=size)


def _cell(text: str) -> Any:
    """A CSV cell as YAML would read it (numbers, booleans), so CSV and YAML scans hash the same."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (bool, int, float, str)) else text


# ---------------------------------------------------------------------------------------------
# solvers: validation against the solver's params dataclass (names, types, values), grid expansion
# ---------------------------------------------------------------------------------------------
def _expand_solvers(model: ManifestModel, path: Path) -> list[SolverConfig]:
    from recon.solvers import get_solver
    from recon.solvers.base import make_params

    configs: list[SolverConfig] = []
    seen: dict[str, str] = {}
    for i, entry in enumerate(model.solvers):
        where = f"{path}: solvers[{i}]"
        try:
            cls = get_solver(entry.name)
        except ValueError as err:
            raise ManifestError(f"{where}.name: {err}") from None
        resources = _resources(model.resources, entry.resources, f"{where}.resources")
        seeds = _seeds(entry.seeds if entry.seeds is not None else model.seeds)
        steps = entry.steps or model.steps or cls.default_steps
        ckpt = entry.checkpoint_every if entry.checkpoint_every is not None else model.checkpoint_every
        for point in _grid(entry.params, cls.Params):
            try:  # names, types, then values as the solver checks them (nothing built: once per config)
                p = make_params(cls.Params, point, where=f"{where}.params", solver=entry.name)
            except (ValueError, TypeError) as err:
                msg = str(err)
                raise ManifestError(msg if f"solver {entry.name!r}" in msg else f"{msg} (solver {entry.name!r})") from None
            aliases = getattr(cls.Params, "ALIASES", {})
            canonical = {aliases.get(k, k): getattr(p, aliases.get(k, k)) for k in point}
            cfg = SolverConfig(entry.name, canonical, steps, seeds, resources, ckpt, where)
            key = canonical_json([cfg.solver, cfg.params, cfg.steps])
            if key in seen:
                raise ManifestError(f"{where}: configuration {cfg.label} at {steps} steps repeats {seen[key]}")
            seen[key] = where
            configs.append(cfg)
    return configs


def _grid(params: dict, params_cls: type) -> list[dict]:
    """Cartesian product over list values (a list-typed field expands only over a list of lists)."""
    hints = typing.get_type_hints(params_cls)
    names = {f.name for f in fields(params_cls)}
    aliases = getattr(params_cls, "ALIASES", {})
    axes = []
    for key, value in params.items():
        hint = hints.get(aliases.get(key, key)) if aliases.get(key, key) in names else None
        list_typed = hint is not None and (typing.get_origin(hint) in (list, tuple) or hint in (list, tuple))
        if isinstance(value, list) and (not list_typed or (value and isinstance(value[0], list))):
            axes.append([(key, v) for v in value])
        else:
            axes.append([(key, value)])
    return [dict(combo) for combo in itertools.product(*axes)]


def _seeds(value: list[int] | int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, list) else (int(value),)


def _resources(default: ResourcesModel, override: dict, where: str) -> Resources:
    try:
        merged = ResourcesModel.model_validate({**default.model_dump(), **override})
    except ValidationError as err:
        msgs = "; ".join(f"{_loc(e['loc'])}: {e['msg']} (got {e.get('input')!r})" for e in err.errors())
        raise ManifestError(f"{where}: {msgs}") from None
    return Resources(**merged.model_dump())


# ---------------------------------------------------------------------------------------------
# jobs
# ---------------------------------------------------------------------------------------------
def expand_jobs(manifest: Manifest) -> list[Job]:
    """scans × solver configs × seeds, in manifest order; ids hash the content, not the order."""
    jobs: list[Job] = []
    seen: dict[str, str] = {}
    base = manifest.path.resolve().parent
    for scan in manifest.scans:
        key = _portable(scan, base)
        names, scan_seeds = manifest.scan_plans.get(scan.id, (None, None))
        for cfg in manifest.configs:
            if names is not None and cfg.solver not in names:
                continue
            for seed in (scan_seeds if scan_seeds is not None else cfg.seeds):
                job_id = job_id_for(key, cfg.solver, cfg.params, seed, cfg.steps, manifest.ssim_every)
                if job_id in seen:  # identical scans under two ids would give identical numbers
                    raise ManifestError(f"{manifest.path}: job {scan.id}/{cfg.label}/seed {seed} repeats {seen[job_id]}")
                seen[job_id] = f"{scan.id}/{cfg.label}/seed {seed}"
                jobs.append(Job(job_id=job_id, index=len(jobs), scan=scan, solver=cfg.solver, params=cfg.params,
                                config=cfg.config, seed=seed, steps=cfg.steps, ssim_every=manifest.ssim_every,
                                resources=cfg.resources, checkpoint_every=cfg.checkpoint_every))
    return jobs


def _portable(scan: ScanSpec, base: Path) -> ScanSpec:
    """The scan with paths relative to the manifest's directory, so moving a cohort keeps its ids."""
    def rel(value: str | None) -> str | None:
        if value is None or value.startswith(PACKAGE_SOURCES):
            return value
        file, sep, fragment = value.partition("#")
        try:
            return Path(file).relative_to(base).as_posix() + sep + fragment
        except ValueError:
            return value
    return replace(scan, source=rel(scan.source), reference=rel(scan.reference))
