"""verify_golden CLI over every shared fixture, its failure reporting, and the comparison helpers."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ss4d_blender.testing import verify_golden
from ss4d_blender.testing.golden_runners.common import Check, coords_check, coords_set_check, tensor_check

REPO = Path(__file__).resolve().parents[1]
MODEL_CASES = ["ss_flow_4d", "ss_flow_4d_full_temporal", "ss_flow_4d_insert_temporal", "ss_flow_4d_patch2_ape",
               "ss_decoder", "sampler_guidance_interval", "slat_flow_4d", "slat_flow_4d_non", "slat_gs_decoder_4d",
               "slat_mesh_decoder", "sparse_ops"]
LINE = re.compile(r"^(\S+)\s+(\S+)\s+(\S+)\s+(PASS|FAIL)(.*)$")


def _parse(stdout: str) -> dict:
    rows = {}
    for line in stdout.splitlines():
        m = LINE.match(line)
        if m and m.group(1) != "case":
            name, max_abs, rel, status, note = m.groups()
            assert name not in rows, f"two lines for {name}"
            rows[name] = dict(max_abs=float(max_abs) if max_abs != "-" else None,
                              rel_l2=float(rel) if rel != "-" else None, status=status, note=note.strip())
    return rows


def _cases(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if (p / "manifest.json").is_file())


def test_cli_over_every_shared_case(shared_dir):
    """Every shared case gets one line and passes at its manifest tolerance; a case whose runner is not
    written yet (BiRefNet before matting lands) is reported as such and fails the run."""
    folders = [shared_dir / "golden"] + sorted(p for p in shared_dir.glob("golden_*") if p.is_dir())
    proc = subprocess.run([sys.executable, "-m", "ss4d_blender.testing.verify_golden", *map(str, folders)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    print(proc.stdout, proc.stderr)
    rows = _parse(proc.stdout)
    expected = [c for f in folders for c in _cases(f)]
    assert set(_cases(shared_dir / "golden")) >= set(MODEL_CASES)
    assert sorted(rows) == sorted(expected), "every case gets exactly one line"
    unrunnable = {name: row for name, row in rows.items() if "no runner" in row["note"]}
    assert set(unrunnable) <= {"birefnet"} and ("BiRefNet" in verify_golden.RUNNERS) == (not unrunnable), unrunnable
    for name, row in unrunnable.items():
        assert row["status"] == "FAIL" and "no runner for BiRefNet" in row["note"], row
    for name, row in rows.items():
        if name not in unrunnable:
            assert row["status"] == "PASS", (name, row)
    assert proc.returncode == (1 if unrunnable else 0)
    assert re.search(rf"^{len(expected) - len(unrunnable)}/{len(expected)} cases passed$", proc.stdout, re.M)


def _copy_case(shared_dir, dst: Path, name="ss_flow_4d") -> Path:
    shutil.copytree(shared_dir / "golden" / name, dst)
    return dst


def _main(capsys, *dirs):
    rc = verify_golden.main([str(d) for d in dirs])
    return rc, _parse(capsys.readouterr().out)


def test_cli_passes_and_fails_on_fixture_changes(shared_dir, tmp_path, capsys):
    good = _copy_case(shared_dir, tmp_path / "flow_intact")
    rc, rows = _main(capsys, good)
    assert rc == 0 and rows["flow_intact"]["status"] == "PASS"

    broken = _copy_case(shared_dir, tmp_path / "flow_changed")
    io = load_file(str(broken / "io.safetensors"))
    io["out"] = io["out"].clone()
    io["out"][0, 0, 0, 0, 0] += 1e-3  # 10x the tolerance, in one value
    save_file(io, str(broken / "io.safetensors"))
    rc, rows = _main(capsys, tmp_path)  # a folder of case folders
    assert rc == 1
    assert rows["flow_intact"]["status"] == "PASS" and rows["flow_changed"]["status"] == "FAIL"
    assert abs(rows["flow_changed"]["max_abs"] - 1e-3) < 1e-4


def test_cli_reports_missing_folders_runners_and_crashes(shared_dir, tmp_path, capsys, monkeypatch):
    rc, rows = _main(capsys, tmp_path / "nowhere")
    assert rc == 1 and rows[str(tmp_path / "nowhere")]["status"] == "FAIL"
    assert "not found" in rows[str(tmp_path / "nowhere")]["note"]

    unknown = _copy_case(shared_dir, tmp_path / "ss_decoder", "ss_decoder")
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "name": "SomethingNew"}))
    rc, rows = _main(capsys, unknown)
    assert rc == 1 and "no runner" in rows["ss_decoder"]["note"]

    monkeypatch.setitem(verify_golden.RUNNERS, "SomethingNew", "not_written_yet")
    rc, rows = _main(capsys, unknown)
    assert rc == 1 and "golden_runners.not_written_yet unavailable" in rows["ss_decoder"]["note"]

    crash = unknown
    (crash / "config.json").write_text(json.dumps({**config, "args": {**config["args"], "channels": [16, 16, 16]}}))
    rc, rows = _main(capsys, crash)
    assert rc == 1 and rows["ss_decoder"]["status"] == "FAIL" and "WeightsError" in rows["ss_decoder"]["note"]


def test_find_cases_recurses_but_not_into_cases(tmp_path):
    for rel in ["x/c1", "x/y/c2", "c3", "c3/inner"]:
        (tmp_path / rel).mkdir(parents=True)
        (tmp_path / rel / "manifest.json").write_text("{}")
        (tmp_path / rel / "io.safetensors").write_bytes(b"")
    found = verify_golden.find_cases([tmp_path])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["c3", "x/c1", "x/y/c2"]


def test_comparison_helpers():
    ref = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    ok = tensor_check("a", ref + 1e-6, ref, {"max_abs": 1e-5, "rel_l2": 1e-5})
    assert isinstance(ok, Check) and ok.passed and ok.max_abs == pytest.approx(1e-6, rel=1e-3)
    bad = tensor_check("a", ref + torch.tensor([[0.0, 0.0], [0.0, 1e-3]]), ref, {"max_abs": 1e-4, "rel_l2": 1.0})
    assert not bad.passed and bad.max_abs == pytest.approx(1e-3, rel=1e-3)
    assert bad.rel_l2 == pytest.approx(1e-3 / ref.norm().item(), rel=1e-3)
    shape = tensor_check("a", ref[:1], ref, {"max_abs": 1.0})
    assert not shape.passed and "shape" in shape.note

    coords = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 4], [1, 0, 0, 0]], dtype=torch.int32)
    shuffled = coords[[2, 0, 1]]
    assert coords_check("c", coords, coords).passed
    order = coords_check("c", shuffled, coords)
    assert not order.passed and "row order" in order.note
    as_set = coords_set_check("c", shuffled, coords)
    assert as_set.passed and "row order" in as_set.note
    other = coords.clone()
    other[1, 3] = 5
    assert not coords_set_check("c", other, coords).passed
    assert not coords_set_check("c", coords[:2], coords).passed
