"""Frame sampling (uniform, fps, short videos) and decoding a generated mp4 through decord."""
import numpy as np
import pytest

from vtc.video import load_video, sample_indices, write_video


def test_uniform_matches_lmms_eval_linspace():
    assert sample_indices(100, 5) == [0, 24, 49, 74, 99]
    assert sample_indices(300, 32) == np.linspace(0, 299, 32, dtype=int).tolist()


def test_fewer_frames_than_asked_gives_all():
    assert sample_indices(7, 32) == list(range(7))


def test_fps_sampling_and_cap():
    assert sample_indices(60, None, fps=2, video_fps=30) == [0, 15, 30, 45]
    assert sample_indices(300, 4, fps=10, video_fps=30) == [0, 99, 198, 297]


def test_bad_sampling_arguments():
    with pytest.raises(ValueError, match="needs fps > 0 and the video's fps"):
        sample_indices(10, None, fps=1)
    with pytest.raises(ValueError, match="no frames"):
        sample_indices(0, 4)


def test_decode_generated_mp4_frames_in_order(tmp_path):
    """A white square moves right one column block per frame; decoded samples show it where they should."""
    frames = []
    for t in range(20):
        f = np.zeros((64, 96, 3), dtype=np.uint8)
        f[24:40, 4 * t:4 * t + 16] = 255
        frames.append(f)
    path = write_video(frames, tmp_path / "move.mp4", fps=10)
    got, idx, fps = load_video(path, num_frames=5)
    assert idx == [0, 4, 9, 14, 19] and got.shape == (5, 64, 96, 3) and fps == pytest.approx(10, rel=0.01)
    for frame, t in zip(got, idx):
        col = frame[32, :, 0].astype(int)
        left = int(np.argmax(col > 128))
        assert abs(left - 4 * t) <= 1


def test_video_example_runs_offline():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "examples" / "video_qa.py"), "--frames", "8",
                          "--method", "uniform",
                          "--ratio", "0.25"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    # 8 x 49 + newline -> 8 x 12 + newline
    assert "frames used: 8" in out.stdout and "visual tokens: 393 -> 97 kept" in out.stdout
    assert "options: A. left | B. right | C. up | D. down" in out.stdout  # asked as a Video-MME item
