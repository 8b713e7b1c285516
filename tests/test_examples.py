"""The example programs run end to end."""

from __future__ import annotations

import os
import subprocess
import sys

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")


def test_cat_prints_files_exactly(tmp_path: os.PathLike[str]) -> None:
    """examples/cat.py prints each file byte for byte, including sizes that are not whole blocks."""
    paths = []
    expected = b""
    for size in (0, 1, 65536, 3 * 1024 * 1024 + 17):
        path = os.path.join(os.fspath(tmp_path), f"f{size}")
        data = os.urandom(size)
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
        expected += data
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, "cat.py"), *paths],
                          capture_output=True, timeout=60, check=True)
    assert proc.stdout == expected


def test_cat_reports_missing_file(tmp_path: os.PathLike[str]) -> None:
    """A missing file gives a one-line error and exit status 1."""
    missing = os.path.join(os.fspath(tmp_path), "nope")
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, "cat.py"), missing],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"cat.py: {missing}: No such file or directory"


def test_tour_runs_every_step(tmp_path: os.PathLike[str]) -> None:
    """examples/tour.py (make demo) reports the kernel, copies and verifies a file, and echoes."""
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, "tour.py"), "--size", "2",
                           "--seconds", "0.5", "--dir", os.fspath(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "io_uring  available" in out
    assert "copied and verified 2 MiB" in out and "modification time kept: yes" in out
    assert "errors: 0" in out and "server: summary: backend=saferring" in out
    assert os.listdir(tmp_path) == []  # the copy step's temporary directory is gone


def test_tour_refuses_a_missing_directory(tmp_path: os.PathLike[str]) -> None:
    """A --dir that does not exist is a one-line error and exit status 1, before any step."""
    missing = os.path.join(os.fspath(tmp_path), "nope")
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, "tour.py"), "--dir", missing],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"tour.py: {missing}: not a directory"
    assert proc.stdout == ""
