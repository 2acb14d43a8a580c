"""Test media made on the fly."""
import numpy as np


def write_video(path, frames, codec, pix_fmt):
    """Encodes uint8 RGBA frames [T, H, W, 4] with PyAV (the library read_frames decodes with)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=24)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgba")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
