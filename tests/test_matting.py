"""Chroma key and alpha checks on synthetic frames and on the green-screen sample (frames decoded by
Blender's sequencer are tested in test_blender_addon)."""
import numpy as np
import pytest

from ss4d_blender.engine.errors import InputError
from ss4d_blender.engine.matting import alpha_from_source, chroma_key, measure_key_color


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


def decode(path, count=None):
    import av

    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for i, f in zip(range(count or 10 ** 6), container.decode(video=0))]
    return np.stack(frames)


def test_key_colour_is_measured_from_the_border_even_where_the_object_touches_it():
    frames = green_screen()
    frames[:, 10:40, 20:40] = (180, 90, 60)       # the object reaches the bottom edge
    frames[:, 0:3, :] = (15, 100, 20)             # a shadow band along the top
    key = measure_key_color(frames)
    assert np.allclose(np.asarray(key) * 255, (30, 200, 40), atol=2)
    out = chroma_key(frames)                      # no colour given: the measured one
    assert (out[:, 10:40, 20:40, 3] == 255).all() and (out[:, :10, :, 3] == 0).all()


def test_readme_green_screen_example_is_keyed_like_the_true_alpha(shared_dir):
    """boxing_green.mp4 is the boxing clip composited on a (56, 160, 66) screen: the keyed alpha matches the
    true alpha of samples/boxing (IoU inside the crop box), and the crop box lies inside the frame."""
    from PIL import Image

    from ss4d_blender.engine.preprocess import crop_box

    video = decode(shared_dir / "samples" / "boxing_green.mp4")
    key = measure_key_color(video)
    assert np.allclose(np.asarray(key) * 255, (56, 160, 66), atol=6), key
    keyed = chroma_key(video)[..., 3] > 127
    for i in (0, 15, 31):
        true = np.asarray(Image.open(shared_dir / "samples" / "boxing" / f"{i:02d}.png"))[..., 3] > 127
        x0, y0, x1, y1 = crop_box((np.maximum(keyed[i], true)[None] * 255).astype(np.uint8))
        a = keyed[i, max(y0, 0):y1, max(x0, 0):x1]
        b = true[max(y0, 0):y1, max(x0, 0):x1]
        assert (a & b).sum() / (a | b).sum() >= 0.9
    x0, y0, x1, y1 = crop_box((keyed * 255).astype(np.uint8))
    h, w = keyed.shape[1:]
    assert 0 < x0 and 0 < y0 and x1 < w and y1 < h, (x0, y0, x1, y1)


def test_a_key_that_removes_almost_nothing_is_an_error_naming_frames_and_colour(shared_dir):
    video = decode(shared_dir / "samples" / "boxing_green.mp4", count=4)
    with pytest.raises(InputError, match=r"key colour #00ff00 \(given\) removed only .* frames 11, 12, 13, 14"):
        chroma_key(video, key_color=(0, 1, 0), frame_numbers=[11, 12, 13, 14])


def test_a_background_that_is_no_screen_is_refused_with_what_would_work(shared_dir):
    video = decode(shared_dir / "samples" / "bird_fly_scene.mp4", count=8)
    with pytest.raises(InputError, match="not a green or blue screen") as err:
        chroma_key(video)
    assert "--matting alpha" in str(err.value) and "measured colour #" in str(err.value)
