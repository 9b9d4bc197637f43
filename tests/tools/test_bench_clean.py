"""tools/bench_clean.py: the folder and its competition-layout zip clean to the same photos."""
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import bench_clean  # noqa: E402


def test_the_folder_and_its_zip_are_timed_on_the_same_photos(tmp_path, capsys):
    folder = tmp_path / "n02085620-Chihuahua"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(np.full((70, 70, 3), i * 20, np.uint8)).save(folder / f"n02085620_{i}.jpg")
    assert bench_clean.main([str(tmp_path), "--limit", "10", "--workers", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["source"] for r in rows] == ["folder", "zip"] and [r["photos"] for r in rows] == [10, 10]
    assert all(r["seconds"] >= 0 and r["per_s"] > 0 for r in rows)
