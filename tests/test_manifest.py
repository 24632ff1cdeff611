"""Manifests: validation messages, grid expansion, stable ids, scan ids, CSV / glob scans."""
from __future__ import annotations

import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipeline.manifest import ManifestError, load_manifest

BASE = """
cohort: test
steps: 30
seeds: [0, 1]
size: 32
scans:
  - {id: cam, source: "skimage:camera", task: denoise, params: {sigma: 25}}
  - {id: moon, source: "skimage:moon", task: inpaint, params: {hole_ratio: 0.1}}
solvers:
  - {name: dip, params: {network: tiny}}
  - {name: aseqdip, params: {network: tiny, lambda: [0.5, 1, 2]}}
"""


def write(tmp_path: Path, text: str, name: str = "m.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    msg = str(err.value)
    assert str(path) in msg, f"message must name the file: {msg}"
    return msg


# ------------------------------------------------------------------------------- expansion
def test_grid_expansion_scans_configs_seeds(tmp_path):
    m = load_manifest(write(tmp_path, BASE))
    assert len(m.scans) == 2 and len(m.configs) == 1 + 3
    assert len(m.jobs) == 2 * 4 * 2
    lams = sorted({j.params.get("lam") for j in m.jobs if j.solver == "aseqdip"})
    assert lams == [0.5, 1.0, 2.0]  # the alias 'lambda' is stored under the field name
    assert [j.index for j in m.jobs] == list(range(len(m.jobs)))
    assert {j.seed for j in m.jobs} == {0, 1}
    assert len({j.job_id for j in m.jobs}) == len(m.jobs)
    # one config hash per grid point, shared by its scans and seeds
    assert len({j.config for j in m.jobs}) == 4
    assert all(j.steps == 30 and j.scan.size == 32 for j in m.jobs)


def test_ids_are_stable_and_location_independent(tmp_path):
    a = load_manifest(write(tmp_path, BASE))
    b = load_manifest(write(tmp_path, BASE))
    assert [j.job_id for j in a.jobs] == [j.job_id for j in b.jobs]
    # a cohort directory moved elsewhere (relative file paths) keeps its ids
    for d in ("one", "two"):
        (tmp_path / d).mkdir()
        np.save(tmp_path / d / "x.npy", np.zeros((8, 8), np.float32))
        write(tmp_path / d, BASE.replace('"skimage:camera"', "x.npy"))
    one, two = load_manifest(tmp_path / "one/m.yaml"), load_manifest(tmp_path / "two/m.yaml")
    assert [j.job_id for j in one.jobs] == [j.job_id for j in two.jobs]
    assert one.jobs[0].scan.source == str(tmp_path / "one" / "x.npy")  # resolved against the manifest


def test_editing_one_solver_changes_only_its_job_ids(tmp_path):
    before = load_manifest(write(tmp_path, BASE))
    after = load_manifest(write(tmp_path, BASE.replace("{network: tiny}}", "{network: tiny, lr: 0.001}}")))
    old = {(j.scan.id, j.solver, j.seed, j.params.get("lam")): j.job_id for j in before.jobs}
    new = {(j.scan.id, j.solver, j.seed, j.params.get("lam")): j.job_id for j in after.jobs}
    assert old.keys() == new.keys()
    changed = {k for k in old if old[k] != new[k]}
    assert changed and all(k[1] == "dip" for k in changed)
    assert len(changed) == sum(1 for j in before.jobs if j.solver == "dip")
    # reordering scans or solvers changes rows, not ids
    swapped = BASE.replace("  - {name: dip, params: {network: tiny}}\n", "") + "  - {name: dip, params: {network: tiny}}\n"
    assert {j.job_id for j in load_manifest(write(tmp_path, swapped)).jobs} == set(old.values())


def test_alias_and_field_name_give_the_same_job(tmp_path):
    a = load_manifest(write(tmp_path, BASE.replace("lambda: [0.5, 1, 2]", "lambda: 1")))
    b = load_manifest(write(tmp_path, BASE.replace("lambda: [0.5, 1, 2]", "lam: 1.0")))
    assert [j.job_id for j in a.jobs] == [j.job_id for j in b.jobs]


def test_per_solver_steps_seeds_resources(tmp_path):
    text = BASE.replace("  - {name: dip, params: {network: tiny}}",
                        "  - {name: dip, params: {network: tiny}, steps: 50, seeds: [7],"
                        " resources: {gpus: 0.25, time_min: 5}}") + "resources: {cpus: 2, mem_gb: 3}\n"
    m = load_manifest(write(tmp_path, text))
    dip = [j for j in m.jobs if j.solver == "dip"]
    assert {j.steps for j in dip} == {50} and {j.seed for j in dip} == {7}
    r = dip[0].resources
    assert (r.gpus, r.cpus, r.mem_gb, r.time_min) == (0.25, 2, 3.0, 5.0)
    other = [j for j in m.jobs if j.solver == "aseqdip"][0].resources
    assert (other.gpus, other.cpus, other.time_min) == (0.0, 2, 60.0)


# ------------------------------------------------------------------------------ validation
def test_errors_name_file_field_and_expectation(tmp_path):
    msg = error_of(tmp_path, BASE.replace("steps: 30", "steps: many"))
    assert re.search(r"steps: .*valid integer.*'many'", msg)
    msg = error_of(tmp_path, BASE.replace("cohort: test\n", ""))
    assert "cohort: Field required" in msg
    msg = error_of(tmp_path, BASE.replace("size: 32", "size: 32\nsteeps: 3"))
    assert "steeps" in msg and "Extra inputs are not permitted" in msg
    msg = error_of(tmp_path, BASE.replace("{network: tiny}}", "{network: tiny, lr: fast}}"))
    assert "solvers[0].params.lr: expected a number" in msg
    msg = error_of(tmp_path, BASE.replace("{network: tiny}}", "{network: tiny, input: {a: 1}}}"))
    assert "solvers[0].params.input: Input should be a valid boolean or" in msg and "{'a': 1}" in msg
    msg = error_of(tmp_path, BASE.replace("{network: tiny}}", "{network: tiny, depth: 3}}"))
    assert "solvers[0].params: unknown field(s) depth" in msg
    msg = error_of(tmp_path, BASE.replace("name: dip", "name: dipp"))
    assert "solvers[0].name: unknown solver 'dipp'" in msg and "aseqdip" in msg
    msg = error_of(tmp_path, BASE.replace("task: denoise", "task: denoize"))
    assert "scans[0]" in msg and "denoize" in msg and "inpaint" in msg
    msg = error_of(tmp_path, BASE.replace("{sigma: 25}", "{sigmaa: 25}"))
    assert "scans[0].params: unknown parameter(s) sigmaa" in msg and "sigma" in msg
    msg = error_of(tmp_path, BASE.replace('source: "skimage:camera", ', ""))
    assert "scans[0]: expected exactly one of 'source', 'sources', 'csv' or 'glob'" in msg
    msg = error_of(tmp_path, BASE.replace("resources", "x") .replace("{network: tiny}}",
                                                                    "{network: tiny}, resources: {gpus: -1}}"))
    assert "solvers[0].resources" in msg and "gpus" in msg and "-1" in msg
    msg = error_of(tmp_path, "- just\n- a list\n")
    assert "expected a mapping" in msg
    msg = error_of(tmp_path, "cohort: [unclosed\n")
    assert "not valid YAML" in msg


@pytest.mark.parametrize("bad", ["../escape", "a/b", "a\\\\b", "", "   ", " padded", "..", "x\\tz"])
def test_unsafe_scan_ids_are_rejected(tmp_path, bad):
    msg = error_of(tmp_path, BASE.replace("id: cam,", f'id: "{bad}",'))
    assert "scans[0]" in msg and ("unsafe scan id" in msg or "scan id is empty" in msg)


def test_duplicate_scan_ids_are_rejected(tmp_path):
    msg = error_of(tmp_path, BASE.replace("id: moon,", "id: cam,"))
    assert "duplicate scan id 'cam'" in msg and "scans[1]" in msg and "scans[0]" in msg


# ------------------------------------------------------------------------------- CSV, glob
def test_csv_scans_with_task_params_and_row_errors(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((8, 8), np.float32))
    (tmp_path / "scans.csv").write_text("id,source,task,sigma,hole_ratio\n"
                                        "a,a.npy,denoise,25,\n"
                                        "b,skimage:moon,inpaint,,0.1\n")
    text = BASE.split("scans:")[0] + "scans:\n  - {csv: scans.csv}\n" + "solvers:" + BASE.split("solvers:")[1]
    m = load_manifest(write(tmp_path, text))
    assert [s.id for s in m.scans] == ["a", "b"]
    assert m.scans[0].task_params == {"sigma": 25} and m.scans[0].source == str(tmp_path / "a.npy")
    assert m.scans[1].task_params == {"hole_ratio": 0.1}
    # a CSV row and the same scan written in YAML are the same job
    yaml_text = text.replace("  - {csv: scans.csv}\n",
                             f'  - {{id: a, source: a.npy, task: denoise, params: {{sigma: 25}}}}\n'
                             f'  - {{id: b, source: "skimage:moon", task: inpaint, params: {{hole_ratio: 0.1}}}}\n')
    assert [j.job_id for j in load_manifest(write(tmp_path, yaml_text, "y.yaml")).jobs] == [j.job_id for j in m.jobs]

    (tmp_path / "scans.csv").write_text("id,source,task,sigma\na,a.npy,denoise,25\n../b,a.npy,denoise,15\n")
    msg = error_of(tmp_path, text)
    assert "scans.csv, row 2 (line 3)" in msg and "unsafe scan id '../b'" in msg
    (tmp_path / "scans.csv").write_text("id,source,task,sigma\na,a.npy,denoise,25\nb,,denoise,15\n")
    assert "row 2 (line 3), column source: empty" in error_of(tmp_path, text)
    (tmp_path / "scans.csv").write_text("id,task\na,denoise\n")
    assert "missing column(s) source" in error_of(tmp_path, text)
    (tmp_path / "scans.csv").write_text("id,source,task,sigmaa\na,a.npy,denoise,25\n")
    msg = error_of(tmp_path, text)
    assert "row 1 (line 2)" in msg and "sigmaa" in msg


def test_glob_scans_env_paths_and_id_template(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("k2", "k1"):
        np.save(data / f"{name}.npy", np.zeros((8, 8), np.float32))
    text = BASE.split("scans:")[0] + textwrap.dedent("""\
        scans:
          - glob: "${MY_DATA:-nowhere}/*.npy"
            id: "{stem}-dn"
            task: denoise
          - glob: "${MY_DATA:-nowhere}/*.npy"
            id: "{stem}-inp"
            task: inpaint
        """) + "solvers:" + BASE.split("solvers:")[1]
    msg = error_of(tmp_path, text)
    assert "scans[0].glob" in msg and "matches no files" in msg and "nowhere" in msg
    monkeypatch.setenv("MY_DATA", str(data))
    m = load_manifest(write(tmp_path, text))
    assert [s.id for s in m.scans] == ["k1-dn", "k2-dn", "k1-inp", "k2-inp"]  # sorted, templated
    assert m.scans[0].source == str(data / "k1.npy")
    monkeypatch.setenv("MY_DATA", str(tmp_path / "empty"))
    assert "matches no files" in error_of(tmp_path, text)
    monkeypatch.delenv("MY_DATA")
    msg = error_of(tmp_path, text.replace("${MY_DATA:-nowhere}", "${MY_DATA}"))
    assert "environment variable MY_DATA is not set" in msg


def test_measured_data_needs_a_measured_task(tmp_path):
    msg = error_of(tmp_path, BASE.replace("task: denoise, params: {sigma: 25}", "task: denoise, kind: measured"))
    assert "cannot use measured data" in msg and "mri" in msg


def test_scan_entries_choose_their_solvers_and_seeds(tmp_path):
    path = write(tmp_path, """
        cohort: subsets
        steps: 5
        size: 32
        scans:
          - {id: cam, source: "skimage:camera", task: denoise, params: {sigma: 25}, solvers: [adjoint, dip], seeds: [0, 1]}
          - {id: phantom, source: "skimage:shepp_logan", task: ct, params: {views: 9}, solvers: [fbp, dip]}
        solvers:
          - {name: fbp, steps: 1}
          - {name: adjoint, steps: 1}
          - {name: dip, params: {network: tiny}}
        """)
    jobs = {(j.scan.id, j.solver, j.seed) for j in load_manifest(path).jobs}
    assert jobs == {("cam", "adjoint", 0), ("cam", "adjoint", 1), ("cam", "dip", 0), ("cam", "dip", 1),
                    ("phantom", "fbp", 0), ("phantom", "dip", 0)}
    # the pre-flight builds only the solvers an entry runs: fbp is never tried on the denoising scan
    from pipeline.preflight import check_manifest
    check_manifest(load_manifest(path))


def test_scan_entry_solvers_must_name_manifest_solvers(tmp_path):
    msg = error_of(tmp_path, BASE.replace('params: {sigma: 25}}', 'params: {sigma: 25}, solvers: [dip, fbp]}'))
    assert "scans[0].solvers: 'fbp'" in msg and "dip, aseqdip" in msg
