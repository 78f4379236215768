"""Video files: MP4 (H.264 through PyAV), PNG frames and contact sheets. Frames are (F, H, W, 3) uint8."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] -> uint8."""
    return np.clip(np.round(frames * 255), 0, 255).astype(np.uint8)


def mp4(frames: np.ndarray, fps: int) -> bytes:
    """H.264 (yuv420p, CRF 18) in an MP4 container; odd sizes are padded by one edge pixel (yuv420p needs even)."""
    import av

    height, width = frames.shape[1] + frames.shape[1] % 2, frames.shape[2] + frames.shape[2] % 2
    frames = np.pad(frames, ((0, 0), (0, height - frames.shape[1]), (0, width - frames.shape[2]), (0, 0)), mode="edge")
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "18"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def read_mp4(data: bytes) -> np.ndarray:
    """The frames of an MP4 (F, H, W, 3) uint8."""
    import av

    with av.open(io.BytesIO(data)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def png(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return buffer.getvalue()


def sheet_frames(frames: np.ndarray, count: int) -> np.ndarray:
    """`count` frames evenly spaced from the first to the last (all of them when there are fewer)."""
    index = np.unique(np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int))
    return frames[index]


def contact_sheet(rows: list[np.ndarray]) -> bytes:
    """One row per video of its frames (n, H, W, 3) side by side, as a PNG (rows may differ in length)."""
    height, width = rows[0].shape[1:3]
    sheet = np.zeros((height * len(rows), width * max(len(r) for r in rows), 3), np.uint8)
    for r, row in enumerate(rows):
        for c, frame in enumerate(row):
            sheet[r * height:(r + 1) * height, c * width:(c + 1) * width] = frame
    return png(sheet)


def stack(pngs: list[bytes]) -> bytes:
    """PNG images one above the other, left-aligned on black, as one PNG."""
    images = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in pngs]
    sheet = np.zeros((sum(i.shape[0] for i in images), max(i.shape[1] for i in images), 3), np.uint8)
    top = 0
    for image in images:
        sheet[top:top + image.shape[0], :image.shape[1]] = image
        top += image.shape[0]
    return png(sheet)
