"""How far reduced precision moves each model from the reference, on the parity fixtures.

For every model case of ../shared/golden that our float32 code reproduces (dense flows, the structure
decoder, the 4D Gaussian decoder), the same weights and inputs are run with the layers in fp32 / bf16 /
fp16 (norms stay in float32, as `loading.cast_precision` does for generation) and compared with the
reference's float32 output: max abs and relative L2 error. Tiny random-weight models (the fixtures), CPU
by default; this is evidence for the default precision, not a quality metric of real results.

    .venv/bin/python bench/precision.py [--device cpu|cuda] [--golden ../shared/golden]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ss4d_blender.testing.golden_runners.common import errors  # noqa: E402
from ss4d_blender.engine.loading import build_model, cast_precision  # noqa: E402
from ss4d_blender.engine.sparse import SparseTensor  # noqa: E402

CASES = ["ss_flow_4d", "ss_flow_4d_full_temporal", "ss_flow_4d_insert_temporal", "ss_flow_4d_patch2_ape",
         "ss_decoder", "slat_gs_decoder_4d"]


def run(case_dir: Path, precision: str, device: str) -> tuple[float, float]:
    config = json.loads((case_dir / "config.json").read_text())
    manifest = json.loads((case_dir / "manifest.json").read_text())
    io = {k: v.to(device) for k, v in load_file(str(case_dir / "io.safetensors")).items()}
    model = build_model(config)
    model.load_state_dict(load_file(str(case_dir / "weights.safetensors")), strict=True)
    model = cast_precision(model, precision).to(device).eval()
    frames = int(manifest.get("non_tensor_args", {}).get("num_frames", 1))
    with torch.no_grad():
        if "cond" in io:
            out, ref = model(io["x"].float(), io["t"].float(), io["cond"].float(), num_frames=frames), io["out"]
        elif "logits" in io:
            out, ref = model(io["z"].float()), io["logits"]
        else:
            x = SparseTensor(io["feats"].float(), io["coords"].int())
            out, ref = model.decode_features(x, frames).feats, io["raw_feats"]
    return errors(out.float(), ref.float())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--golden", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "golden")
    a = p.parse_args()
    print(f"device {a.device} | torch {torch.__version__} | "
          "error vs the reference's float32 output (tiny random-weight models)")
    print(f"{'case':28} " + " ".join(f"{p + ' max_abs':>13} {p + ' rel_l2':>11}" for p in ("fp32", "bf16", "fp16")))
    for case in CASES:
        cells = []
        for precision in ("fp32", "bf16", "fp16"):
            try:
                max_abs, rel = run(a.golden / case, precision, a.device)
                cells.append(f"{max_abs:13.2e} {rel:11.2e}")
            except Exception as err:  # noqa: BLE001 - a precision the device cannot run is reported, not fatal
                cells.append(f"{'n/a (' + type(err).__name__ + ')':>25}")
        print(f"{case:28} " + " ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
