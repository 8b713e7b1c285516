"""Build saferring._uring, the cffi out-of-line API-mode extension, against the system liburing.

Kept thin on purpose: the declarations live in ``src/saferring/_cffi_src/uring.h`` (the cdef) and
the hot path in ``uring.c``, kernel-managed buffers in ``buffers.c``, the behaviour probes in
``kernel_probes.c`` and the asyncio file layer's non-blocking reads in ``nowait.c`` (the source).
This script only finds liburing, reads its version,
stamps the package version into the module (checked at import, so a stale build fails loudly) and
hands everything to cffi.  ``python build_ffi.py`` compiles in place, for development.

Environment knobs:
  SAFERRING_LIBURING_PREFIX  prefix of a liburing install to use instead of the system one
                             (its include/ and lib/ are searched first)
  SAFERRING_CFLAGS           extra compiler flags (e.g. "-O0 -g -fsanitize=address")
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
SRC = HERE / "src" / "saferring" / "_cffi_src"

MISSING_LIBURING = """\
saferring needs liburing's development files (liburing.h), and none were found.
Install them, then build again:
    Debian/Ubuntu:  sudo apt-get install liburing-dev
    Fedora/RHEL:    sudo dnf install liburing-devel
    Arch:           sudo pacman -S liburing
or point SAFERRING_LIBURING_PREFIX at a liburing install prefix."""


def _package_version() -> str:
    text = (HERE / "src" / "saferring" / "_version.py").read_text()
    match = re.search(r'__version__ = "([^"]+)"', text)
    if match is None:
        raise RuntimeError("src/saferring/_version.py has no __version__")
    return match.group(1)


def _pkg_config(*args: str) -> str | None:
    exe = shutil.which("pkg-config")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, *args, "liburing"], capture_output=True, text=True, check=True)
    except subprocess.CalledProcessError:
        return None
    return out.stdout.strip()


def find_liburing() -> tuple[list[str], list[str], tuple[int, int] | None]:
    """Return (include_dirs, library_dirs, (major, minor) or None) for liburing, or exit."""
    prefix = os.environ.get("SAFERRING_LIBURING_PREFIX")
    if prefix:
        inc = Path(prefix, "include")
        if not (inc / "liburing.h").exists():
            sys.exit(f"SAFERRING_LIBURING_PREFIX={prefix}: no include/liburing.h there.\n")
        libs = [d for d in (Path(prefix, "lib"), Path(prefix, "lib64")) if (d / "liburing.so").exists()]
        if not libs:
            sys.exit(f"SAFERRING_LIBURING_PREFIX={prefix}: no lib/liburing.so or lib64/liburing.so there.\n")
        lib_dirs = [str(libs[0])]
        return [str(inc)], lib_dirs, _header_version(inc) or _library_version(lib_dirs)

    include_dirs: list[str] = []
    library_dirs: list[str] = []
    version: tuple[int, int] | None = None
    modversion = _pkg_config("--modversion")
    if modversion:
        match = re.match(r"(\d+)\.(\d+)", modversion)
        if match:
            version = (int(match.group(1)), int(match.group(2)))
        for flag in shlex.split(_pkg_config("--cflags-only-I") or ""):
            include_dirs.append(flag[2:])
        for flag in shlex.split(_pkg_config("--libs-only-L") or ""):
            library_dirs.append(flag[2:])

    candidates = [*include_dirs, "/usr/include", "/usr/local/include"]
    header_dir = next((d for d in candidates if Path(d, "liburing.h").exists()), None)
    if header_dir is None:
        sys.exit(MISSING_LIBURING)
    if header_dir not in include_dirs and header_dir != "/usr/include":
        include_dirs.append(header_dir)
        library_dirs.append(str(Path(header_dir).parent / "lib"))
    return include_dirs, library_dirs, (version or _header_version(Path(header_dir))
                                        or _library_version(library_dirs))


def _header_version(include_dir: Path) -> tuple[int, int] | None:
    """liburing >= 2.4 ships io_uring_version.h; older ones say nothing in their headers."""
    header = include_dir / "liburing" / "io_uring_version.h"
    if not header.exists():
        return None
    text = header.read_text()
    major = re.search(r"IO_URING_VERSION_MAJOR\s+(\d+)", text)
    minor = re.search(r"IO_URING_VERSION_MINOR\s+(\d+)", text)
    if major is None or minor is None:
        return None
    return int(major.group(1)), int(minor.group(1))


def _library_version(library_dirs: list[str]) -> tuple[int, int] | None:
    """liburing < 2.4 without pkg-config: its build names the library liburing.so.MAJOR.MINOR."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    dirs = [*library_dirs, f"/usr/lib/{multiarch}", "/usr/lib64", "/usr/lib", "/usr/local/lib"]
    for d in dirs:
        so = Path(d, "liburing.so")
        if so.exists():
            match = re.fullmatch(r"liburing\.so\.(\d+)\.(\d+)(?:\.\d+)*", so.resolve().name)
            return (int(match.group(1)), int(match.group(2))) if match else None
    return None


def make_ffi() -> FFI:
    include_dirs, library_dirs, version = find_liburing()
    macros = [("SR_BUILD_STAMP", f'"{_package_version()}"')]
    if version is not None:
        macros += [("SR_LIBURING_VERSION_MAJOR", str(version[0])),
                   ("SR_LIBURING_VERSION_MINOR", str(version[1]))]
    extra = ["-O2", "-Wall", "-Wno-unused-function", "-Wno-unused-variable"]
    extra += shlex.split(os.environ.get("SAFERRING_CFLAGS", ""))

    builder = FFI()
    builder.cdef((SRC / "uring.h").read_text())
    builder.set_source(
        "saferring._uring",
        # One translation unit: the hot path, buffers, the behaviour probes, non-blocking reads.
        "\n".join((SRC / name).read_text()
                  for name in ("uring.c", "buffers.c", "kernel_probes.c", "nowait.c")),
        libraries=["uring"],
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        runtime_library_dirs=[d for d in library_dirs if os.environ.get("SAFERRING_LIBURING_PREFIX")],
        define_macros=macros,
        extra_compile_args=extra,
    )
    return builder


ffi = make_ffi()

if __name__ == "__main__":
    ffi.compile(tmpdir=str(HERE / "src"), verbose=True)
