"""Video loading for video QA and Video-MME: frame sampling (lmms-eval conventions), decord decoding, mp4 writing.

decord and PyAV are optional (``pip install 'vtc[video]'``) and imported only when used.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def sample_indices(total: int, num_frames: int | None = 32, fps: float | None = None,
                   video_fps: float | None = None) -> list[int]:
    """Frame indices to decode out of ``total``.

    ``num_frames``: uniform sampling as lmms-eval's LLaVA-OneVision / llava_hf wrappers do
    (``np.linspace(0, total - 1, n, dtype=int)``); a video with fewer frames than asked gives all its frames.
    ``fps``: one frame every ``video_fps / fps`` source frames instead (needs ``video_fps``); if ``num_frames``
    is also given it caps the count by uniform sub-sampling of those.
    """
    if total <= 0:
        raise ValueError(f"video has no frames (total={total})")
    if fps is not None:
        if fps <= 0 or not video_fps or video_fps <= 0:
            raise ValueError(f"fps sampling needs fps > 0 and the video's fps; got fps={fps}, video_fps={video_fps}")
        idx = np.arange(0, total, video_fps / fps).astype(int)
        if num_frames is not None and len(idx) > num_frames:
            idx = idx[np.linspace(0, len(idx) - 1, num_frames, dtype=int)]
        return idx.tolist()
    if num_frames is None or num_frames <= 0:
        raise ValueError(f"give num_frames > 0 or fps; got num_frames={num_frames}, fps={fps}")
    if total <= num_frames:
        return list(range(total))
    return np.linspace(0, total - 1, num_frames, dtype=int).tolist()


def _decord():
    try:
        import decord
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("video loading needs decord: pip install 'vtc[video]'") from e
    return decord


def count_frames(path: str | Path) -> int:
    """Frames in a video (opens its container and index, decodes nothing)."""
    decord = _decord()
    if not Path(path).exists():
        raise FileNotFoundError(f"no video at {path}")
    return len(decord.VideoReader(str(path), ctx=decord.cpu(0)))


def load_video(path: str | Path, num_frames: int | None = 32,
               fps: float | None = None) -> tuple[np.ndarray, list[int], float]:
    """Decode sampled frames with decord: returns (frames (n, H, W, 3) uint8 RGB, indices, the video's fps)."""
    decord = _decord()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no video at {path}")
    vr = decord.VideoReader(str(path), ctx=decord.cpu(0))
    video_fps = float(vr.get_avg_fps())
    idx = sample_indices(len(vr), num_frames, fps, video_fps)
    return vr.get_batch(idx).asnumpy(), idx, video_fps


def write_video(frames: Sequence[np.ndarray], path: str | Path, fps: float = 8.0) -> Path:
    """Encode RGB uint8 frames (H, W, 3), H and W even, to an H.264 mp4 with PyAV."""
    try:
        import av
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("writing videos needs PyAV: pip install 'vtc[video]'") from e
    path = Path(path)
    h, w = frames[0].shape[:2]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=int(round(fps)))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "18"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
