"""build_ffi.py: finding liburing, and saying what to install when it is missing."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)


def _find(env_extra: dict[str, str], patch: str = "") -> subprocess.CompletedProcess[str]:
    code = (
        "import sys; sys.argv = ['build_ffi']\n"
        "import importlib.util, pathlib\n"
        f"spec = importlib.util.spec_from_file_location('b', {os.path.join(ROOT, 'build_ffi.py')!r})\n"
        "b = importlib.util.module_from_spec(spec)\n"
        # only the discovery logic: skip the module-level compile set-up
        "src = open(spec.origin).read().replace('ffi = make_ffi()', 'ffi = None')\n"
        "exec(compile(src, spec.origin, 'exec'), b.__dict__)\n"
        f"{patch}\n"
        "print(b.find_liburing())\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **env_extra})


def test_finds_the_system_liburing_and_its_version() -> None:
    """On this machine liburing is found and its version is read (pkg-config or the library)."""
    proc = _find({})
    assert proc.returncode == 0, proc.stderr
    assert "(2, " in proc.stdout


def test_missing_headers_name_the_package_to_install() -> None:
    """Without liburing.h anywhere, the build stops with the distro package names."""
    patch = ("b._pkg_config = lambda *a: None\n"
             "orig = pathlib.Path.exists\n"
             "pathlib.Path.exists = lambda p: False if p.name == 'liburing.h' else orig(p)")
    proc = _find({}, patch)
    assert proc.returncode != 0
    assert "liburing-dev" in proc.stderr and "liburing-devel" in proc.stderr


def test_bad_prefix_is_refused_clearly(tmp_path: os.PathLike[str]) -> None:
    """SAFERRING_LIBURING_PREFIX pointing at no liburing says so."""
    proc = _find({"SAFERRING_LIBURING_PREFIX": os.fspath(tmp_path)})
    assert proc.returncode != 0
    assert "no include/liburing.h" in proc.stderr
