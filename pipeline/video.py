"""MP4 in and out through imageio-ffmpeg's bundled ffmpeg: H.264, yuv420p, faststart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

DEFAULT_CRF = 18  # visually lossless for generated video at a fraction of the raw size


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> [F, H, W, 3] uint8."""
    frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).contiguous().cpu().numpy()


def write_mp4(frames: np.ndarray, path: Path, fps: int = 16, crf: int = DEFAULT_CRF) -> Path:
    """Encode [F, H, W, 3] uint8 frames as H.264 MP4 (yuv420p, moov atom first for streaming)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count, height, width, _ = frames.shape
    if width % 2 or height % 2:
        raise ValueError(f"yuv420p needs even sizes, got {width}x{height}")
    import imageio_ffmpeg  # here, not at the top: frame conversion needs no ffmpeg

    writer = imageio_ffmpeg.write_frames(
        str(path),
        (width, height),
        fps=fps,
        codec="libx264",
        pix_fmt_out="yuv420p",
        quality=None,
        macro_block_size=1,
        output_params=["-crf", str(crf), "-preset", "medium", "-movflags", "+faststart"],
        ffmpeg_log_level="error",
    )
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    return path


def read_mp4(path: Path) -> tuple[np.ndarray, dict]:
    """Decode an MP4 back to [F, H, W, 3] uint8 and its metadata (size, fps, codec)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = reader.__next__()
    width, height = meta["size"]
    frames = [np.frombuffer(f, dtype=np.uint8).reshape(height, width, 3) for f in reader]
    return np.stack(frames), meta
