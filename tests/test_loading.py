"""Model registry and strict checkpoint loading ({name}.json + {name}.safetensors): errors that name the
key and the file, precision switch, released configurations on the meta device."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ss4d_blender.engine.errors import WeightsError
from ss4d_blender.engine.loading import MODEL_CLASSES, build_model, cast_precision, load_model, model_class
from ss4d_blender.engine.nn.layers import LayerNorm32, MultiHeadRMSNorm

TINY_FLOW = {"name": "SparseStructureFlow4DModel", "args": dict(
    resolution=4, in_channels=4, out_channels=4, model_channels=32, cond_channels=16, num_blocks=2, num_heads=2,
    mlp_ratio=2, patch_size=1, pe_mode="rope_t", qk_rms_norm=True, use_fp16=True, use_checkpoint=False,
    expand_self_attn=True, window_size=2)}

GS_REPRESENTATION = {  # TRELLIS slat_dec_gs_swin8_B_64l8gs32 representation (32 Gaussians per voxel)
    "lr": {"_xyz": 1.0, "_features_dc": 1.0, "_opacity": 1.0, "_scaling": 1.0, "_rotation": 0.1},
    "perturb_offset": True, "voxel_size": 1.5, "num_gaussians": 32, "2d_filter_kernel_size": 0.1,
    "3d_filter_kernel_size": 9e-4, "scaling_bias": 4e-3, "opacity_bias": 0.1, "scaling_activation": "softplus"}

RELEASED = {
    # lizb6626/SS4D ckpts/ss_flow_video_4d
    "ss_flow_video_4d": {"name": "SparseStructureFlow4DModel", "args": dict(
        resolution=16, in_channels=8, out_channels=8, model_channels=1024, cond_channels=1024, num_blocks=24,
        num_heads=16, mlp_ratio=4, patch_size=1, pe_mode="rope_t", qk_rms_norm=True, use_fp16=True,
        expand_self_attn=True, window_size=8)},
    # TRELLIS ckpts/ss_dec_conv3d_16l8_fp16
    "ss_dec_conv3d_16l8_fp16": {"name": "SparseStructureDecoder", "args": dict(
        out_channels=1, latent_channels=8, num_res_blocks=2, num_res_blocks_middle=2, channels=[512, 128, 32],
        use_fp16=True)},
    # lizb6626/SS4D ckpts/slat_flow_video_4d
    "slat_flow_video_4d": {"name": "SLatFlow4DModel", "args": dict(
        resolution=64, in_channels=8, out_channels=8, model_channels=1024, cond_channels=1024, num_blocks=24,
        num_heads=16, mlp_ratio=4, patch_size=2, num_io_res_blocks=2, num_io_res4d_blocks=2,
        io_block_channels=[128], io_block_channels_t=[1024], pe_mode="rope_t", qk_rms_norm=True, use_fp16=True,
        expand_self_attn=True, conv_type="3D_1D")},
    # lizb6626/SS4D ckpts/slat_dec_gs_4d: TRELLIS's swin8_B_64l8gs32 decoder with SS4D's temporal attention
    "slat_dec_gs_4d": {"name": "SLatGaussianDecoder", "args": dict(
        resolution=64, model_channels=768, latent_channels=8, num_blocks=12, num_heads=12, mlp_ratio=4,
        attn_mode="swin", window_size=8, pe_mode="rope_t", use_fp16=True, use_checkpoint=False,
        expand_self_attn=True, representation_config=GS_REPRESENTATION)},
    # microsoft/TRELLIS-image-large ckpts/slat_dec_mesh_swin8_B_64l8m256c_fp16
    "slat_dec_mesh_swin8_B_64l8m256c_fp16": {"name": "SLatMeshDecoder", "args": dict(
        resolution=64, model_channels=768, latent_channels=8, num_blocks=12, num_heads=12, mlp_ratio=4,
        attn_mode="swin", window_size=8, use_fp16=True, representation_config={"use_color": True})},
}


def _randomised(config):
    torch.manual_seed(0)
    model = build_model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def _write(folder: Path, name: str, config: dict, state: dict) -> Path:
    (folder / f"{name}.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / f"{name}.safetensors"))
    return folder / name


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(4, 4, 4, 4, 4, generator=g), torch.rand(4, generator=g) * 1000,
            torch.randn(4, 3, 16, generator=g))


@pytest.fixture
def checkpoint(tmp_path):
    model = _randomised(TINY_FLOW)
    return model, _write(tmp_path, "tiny_flow", TINY_FLOW, model.state_dict())


def test_load_round_trip_and_path_forms(checkpoint):
    model, path = checkpoint
    x, t, cond = _inputs()
    with torch.no_grad():
        expected = model(x, t, cond, num_frames=4)
    for form in (path, str(path) + ".json", str(path) + ".safetensors"):
        loaded = load_model(form)
        assert not loaded.training
        with torch.no_grad():
            assert torch.equal(loaded(x, t, cond, num_frames=4), expected)


def _error(path) -> str:
    with pytest.raises(WeightsError) as info:
        load_model(path)
    return str(info.value)


def test_missing_key_names_key_and_file(tmp_path):
    state = _randomised(TINY_FLOW).state_dict()
    del state["blocks.1.cross_attn.to_kv.weight"]
    msg = _error(_write(tmp_path, "ckpt", TINY_FLOW, state))
    assert "missing key 'blocks.1.cross_attn.to_kv.weight'" in msg and "ckpt.safetensors" in msg


def test_unexpected_key_names_key_and_file(tmp_path):
    state = _randomised(TINY_FLOW).state_dict()
    state["blocks.0.cross_attn.q_rms_norm.gamma"] = torch.ones(2, 16)
    msg = _error(_write(tmp_path, "ckpt", TINY_FLOW, state))
    assert "unexpected key 'blocks.0.cross_attn.q_rms_norm.gamma'" in msg and "ckpt.safetensors" in msg


def test_shape_mismatch_names_key_shapes_and_file(tmp_path):
    state = _randomised(TINY_FLOW).state_dict()
    state["out_layer.weight"] = torch.zeros(5, 32)
    msg = _error(_write(tmp_path, "ckpt", TINY_FLOW, state))
    assert "'out_layer.weight'" in msg and "(5, 32)" in msg and "(4, 32)" in msg and "ckpt.safetensors" in msg


def test_missing_files_are_named_with_how_to_get_them(checkpoint):
    _, path = checkpoint
    Path(str(path) + ".safetensors").unlink()
    msg = _error(path)
    assert "tiny_flow.safetensors" in msg and "Download" in msg
    Path(str(path) + ".json").unlink()
    msg = _error(path)
    assert "tiny_flow.json" in msg and "Download" in msg


def test_damaged_weights_file(checkpoint):
    _, path = checkpoint
    weights = Path(str(path) + ".safetensors")
    weights.write_bytes(weights.read_bytes()[:1000])
    msg = _error(path)
    assert "tiny_flow.safetensors" in msg and "damaged" in msg


def test_configuration_errors(tmp_path, checkpoint):
    model, _ = checkpoint
    bad_args = {"name": TINY_FLOW["name"], "args": {**TINY_FLOW["args"], "bogus_option": 1}}
    msg = _error(_write(tmp_path, "bad_args", bad_args, model.state_dict()))
    assert "bad_args.json" in msg and "bogus_option" in msg
    msg = _error(_write(tmp_path, "bad_name", {"name": "NoSuchModel", "args": {}}, model.state_dict()))
    assert "NoSuchModel" in msg


def test_training_only_args_are_accepted():
    args = {**TINY_FLOW["args"], "use_checkpoint": True, "use_fp16": True}
    build_model({"name": TINY_FLOW["name"], "args": args}, device="meta")


def test_weights_stored_in_fp16_load_as_requested(tmp_path):
    """The official checkpoints store half-precision tensors; fp32 loading upcasts them."""
    model = _randomised(TINY_FLOW)
    path = _write(tmp_path, "half", TINY_FLOW, {k: v.half() for k, v in model.state_dict().items()})
    loaded = load_model(path, precision="fp32")
    assert all(p.dtype == torch.float32 for p in loaded.state_dict().values())
    ref = model.half().float()
    x, t, cond = _inputs()
    with torch.no_grad():
        assert torch.allclose(loaded(x, t, cond, num_frames=4), ref(x, t, cond, num_frames=4), atol=1e-5)


@pytest.mark.parametrize("precision,dtype,tol", [("fp16", torch.float16, 5e-3), ("bf16", torch.bfloat16, 3e-2),
                                                 (torch.bfloat16, torch.bfloat16, 3e-2)])
def test_precision_switch(checkpoint, precision, dtype, tol):
    model, path = checkpoint
    low = load_model(path, precision=precision)
    for module in low.modules():
        own = list(module.parameters(recurse=False))
        if isinstance(module, (LayerNorm32, MultiHeadRMSNorm)):  # norms keep float32 as in the reference
            assert all(p.dtype == torch.float32 for p in own)
        elif isinstance(module, torch.nn.Linear):
            assert all(p.dtype == dtype for p in own)
    assert low.pos_emb.dtype == torch.float32  # fixed tables stay float32
    assert low.blocks[0].norm2.weight.dtype == torch.float32
    x, t, cond = _inputs()
    with torch.no_grad():
        ref = model(x, t, cond, num_frames=4)
        out = low(x, t, cond, num_frames=4)
    assert out.dtype == torch.float32
    rel = float((out - ref).norm() / ref.norm())
    assert rel < tol, rel


def test_bad_precision_name():
    with pytest.raises(ValueError):
        cast_precision(torch.nn.Linear(2, 2), "fp8")


def test_registry_names_and_lazy_import():
    assert set(MODEL_CLASSES) >= {"SparseStructureFlow4DModel", "SparseStructureDecoder", "SLatFlow4DModel",
                                  "SLatGaussianDecoder", "SLatMeshDecoder"}
    for name in MODEL_CLASSES:
        assert model_class(name).__name__ in name  # registry key = reference class name (or its Elastic form)


@pytest.mark.parametrize("ckpt", sorted(RELEASED))
def test_released_configs_instantiate_on_meta(ckpt):
    model = build_model(RELEASED[ckpt], device="meta")
    params = sum(p.numel() for p in model.parameters())
    assert all(p.is_meta for p in model.parameters())
    print(f"\n{ckpt} ({RELEASED[ckpt]['name']}): {params:,} parameters")
    assert params > 5e7


def test_engine_never_unpickles():
    """safetensors only: no torch.load / pickle anywhere in the engine."""
    engine = Path(__file__).resolve().parents[1] / "ss4d_blender" / "engine"
    for source in engine.rglob("*.py"):
        text = source.read_text()
        assert "torch.load(" not in text and "import pickle" not in text, source


def test_auto_precision_is_fp16_on_gpus_and_fp32_on_the_cpu():
    """fp16 as the reference runs its blocks (bench/precision.py: ~8x closer to the fixtures than bf16)."""
    from ss4d_blender.engine.memory import default_precision

    assert default_precision(torch.device("cpu")) == "fp32"
    assert default_precision(torch.device("cuda")) == "fp16" and default_precision(torch.device("mps")) == "fp16"
    assert default_precision(torch.device("cuda"), "bf16") == "bf16"
