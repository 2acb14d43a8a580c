"""Chroma key and alpha checks on synthetic frames and on the green-screen sample (frames decoded by
Blender's sequencer are tested in test_blender_addon)."""
import numpy as np
import pytest

from ss4d_blender.engine.errors import InputError
from ss4d_blender.engine.matting import alpha_from_source, chroma_key


def green_screen(t=2, h=40, w=60):
    frames = np.zeros((t, h, w, 3), np.uint8)
    frames[...] = (30, 200, 40)          # screen
    frames[:, 10:30, 20:40] = (180, 90, 60)   # object
    frames[:, 5:8, 5:8] = (20, 120, 30)       # screen in shadow: darker but same hue
    return frames


def test_chroma_key_separates_object_from_screen_and_shadow():
    out = chroma_key(green_screen(), key_color=(30 / 255, 200 / 255, 40 / 255))
    assert out.shape == (2, 40, 60, 4)
    assert (out[:, 10:30, 20:40, 3] == 255).all()
    assert (out[:, 0:5, :, 3] == 0).all() and (out[:, 5:8, 5:8, 3] == 0).all()
    np.testing.assert_array_equal(out[:, 15, 25, :3], [[180, 90, 60]] * 2)


def test_softness_gives_partial_alpha_and_despill():
    frames = np.zeros((1, 1, 3, 3), np.uint8)
    frames[0, 0] = [(0, 255, 0), (90, 160, 90), (200, 50, 50)]
    out = chroma_key(frames, (0, 1, 0), tolerance=0.05, softness=0.4)
    a = out[0, 0, :, 3]
    assert a[0] == 0 and 0 < a[1] < 255 and a[2] == 255
    assert out[0, 0, 1, 1] < 160  # green spill pulled down on the half-kept pixel


def test_chroma_key_that_removes_everything_is_a_clear_error():
    with pytest.raises(InputError, match="removed everything"):
        chroma_key(green_screen(), key_color=(30 / 255, 200 / 255, 40 / 255), tolerance=0.9)
    with pytest.raises(InputError, match="grey"):
        chroma_key(green_screen(), key_color=(0.5, 0.5, 0.5))


def test_alpha_source_checks():
    rgba = np.zeros((2, 8, 8, 4), np.uint8)
    with pytest.raises(InputError, match="empty"):
        alpha_from_source(rgba)
    rgba[..., 3] = 255
    with pytest.raises(InputError, match="opaque everywhere"):
        alpha_from_source(rgba)
    with pytest.raises(InputError, match="no alpha"):
        alpha_from_source(rgba[..., :3])
    rgba[:, :4, :, 3] = 0
    assert alpha_from_source(rgba) is rgba
