"""Checks parity fixtures in the ../shared/golden format.

    python -m ss4d_blender.testing.verify_golden DIR [DIR...]

Each DIR is a case folder (manifest.json + io.safetensors [+ config.json + weights.safetensors], or a
pipeline folder with pipeline.json) or a folder holding such folders (searched recursively). Prints one line per
case: name, max abs error, relative L2 error and PASS/FAIL of its worst check (with a note when there is one); with
`--verbose` every check. Exit status 0 only if every case passes.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import traceback
from pathlib import Path

# config["name"] (or the case kind) -> runner module under golden_runners
RUNNERS = {
    "SparseStructureFlow4DModel": "dense",
    "SparseStructureDecoder": "dense",
    "sampler": "dense",
    "SLatFlow4DModel": "slat_flow",
    "SLatGaussianDecoder": "decoders",
    "SLatMeshDecoder": "decoders",
    "SparseOpsHolder": "sparse_ops",
    "FlexiCubes": "flexicubes",
    "TrellisVideoTo4DPipeline": "pipeline",
    "BiRefNet": "birefnet",
}


def is_case(path: Path) -> bool:
    return (path / "manifest.json").is_file() and (path / "io.safetensors").is_file()


def find_cases(paths: list[Path]) -> list[Path]:
    """Case folders at or below each path (a case folder is not searched further), sorted by name."""
    cases = []
    for p in paths:
        if is_case(p):
            cases.append(p)
        elif p.is_dir():
            cases.extend(find_cases(sorted(c for c in p.iterdir() if c.is_dir())))
    return cases


def case_kind(case_dir: Path, config: dict | None, manifest: dict) -> str:
    if (case_dir / "pipeline.json").is_file():
        return json.loads((case_dir / "pipeline.json").read_text())["name"]
    if "Sampler" in manifest.get("class", ""):  # a sampler over the folder's model, whatever the model
        return "sampler"
    if config is not None:
        return config["name"]
    if manifest.get("class", "").startswith("FlexiCubes"):
        return "FlexiCubes"
    return manifest.get("class", "unknown")


def run_case(case_dir: Path):
    """-> (list of Check, error message or None)."""
    from safetensors.torch import load_file

    manifest = json.loads((case_dir / "manifest.json").read_text())
    config_path = case_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else None
    kind = case_kind(case_dir, config, manifest)
    module = RUNNERS.get(kind)
    if module is None:
        return [], f"no runner for {kind}"
    try:
        runner = importlib.import_module(f"{__package__}.golden_runners.{module}")
    except ImportError as err:
        return [], f"runner golden_runners.{module} unavailable: {err}"
    io = load_file(str(case_dir / "io.safetensors"))
    return runner.run(case_dir, config, manifest, io), None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ss4d_blender.testing.verify_golden", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--verbose", "-v", action="store_true", help="print every check of every case")
    args = parser.parse_args(argv)
    missing = [d for d in args.dirs if not d.exists()]
    cases = find_cases([d for d in args.dirs if d.exists()])
    if not cases and not missing:
        print("no cases found", file=sys.stderr)
        return 1
    print(f"{'case':32} {'max_abs':>10} {'rel_l2':>10}  result")
    for d in missing:
        print(f"{str(d):32} {'-':>10} {'-':>10}  FAIL  (folder not found)")
    all_ok = not missing
    n_passed = 0
    for case in cases:
        try:
            checks, error = run_case(case)
        except Exception as err:  # noqa: BLE001 - a crash is a failure of that case, not of the tool
            checks, error = [], f"{type(err).__name__}: {err}"
            if args.verbose:
                traceback.print_exc()
        if error is not None or not checks:
            print(f"{case.name:32} {'-':>10} {'-':>10}  FAIL  ({error or 'no checks'})")
            all_ok = False
            continue
        failed = [c for c in checks if not c.passed]
        worst = max(failed or checks, key=lambda c: (c.max_abs, c.rel_l2))
        ok = not failed
        all_ok &= ok
        n_passed += ok
        note = f"  [{worst.name}] {worst.note}".rstrip() if (worst.note or failed) else ""
        print(f"{case.name:32} {worst.max_abs:10.3g} {worst.rel_l2:10.3g}  {'PASS' if ok else 'FAIL'}{note}")
        if args.verbose:
            for c in checks:
                print(f"    {c.name:28} {c.max_abs:10.3g} {c.rel_l2:10.3g}  {'ok' if c.passed else 'FAIL'}  {c.note}")
    print(f"{n_passed}/{len(cases)} cases passed" + (f", {len(missing)} folder(s) not found" if missing else ""))
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
