"""Which C allocator a grpokit process runs on, and starting the commands that load models on tcmalloc.

torch allocates CPU tensors with posix_memalign(64). glibc before 2.39 does not reuse such a freed block for the
next tensor of its size (see `plan.allocator_keeps_freed_blocks`), so a training process on CPU holds freed memory
that depends on its heap's history: SmolLM2-135M's LoRA run peaked at 8.1 GiB where its tensors need 6.0 GiB.
gperftools' tcmalloc reuses those blocks and was not slower (benchmarks/RESULTS.md). So `grpokit train` and the
other commands that load a model restart themselves once, before torch is imported, with tcmalloc in LD_PRELOAD
when the process is on such a glibc and a tcmalloc library is installed (Debian/Ubuntu: libtcmalloc-minimal4; conda:
gperftools). The restart is an exec: the process keeps its pid, arguments, environment and launcher (torchrun,
accelerate). GRPOKIT_ALLOCATOR chooses:

  auto      (default) tcmalloc when glibc is older than 2.39 and tcmalloc is installed; otherwise as started
  system    as started: the C library's malloc, or whatever LD_PRELOAD already names
  tcmalloc  or jemalloc: that library, an error when it is not installed
  a path    that shared library

Only the command-line entry point restarts (`grpokit ...`, `python -m grpokit ...`); `grpokit.cli.main(argv)` called
from Python, and the Python API, run on the allocator their process started with.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import platform
import sys

from grpokit.errors import ConfigError

ENV = "GRPOKIT_ALLOCATOR"
_RESTARTED = "GRPOKIT_ALLOCATOR_RESTARTED"  # set on the restart: never exec twice
_LIBRARIES = {"tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"), "jemalloc": ("libjemalloc.so.2",)}
_INSTALL = {"tcmalloc": "apt install libtcmalloc-minimal4 (Debian/Ubuntu), or conda install gperftools",
            "jemalloc": "apt install libjemalloc2 (Debian/Ubuntu), or conda install jemalloc"}
# tcmalloc prints a line for every allocation above this many bytes (default 1 GiB); a model's weights are one
_REPORT_THRESHOLD = "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"


def _library_dirs() -> list[str]:
    multiarch = getattr(sys.implementation, "_multiarch", "")
    dirs = [os.path.join(sys.prefix, "lib"), os.path.join(sys.base_prefix, "lib")]  # conda environments
    for root in ("/usr/local/lib", "/usr/lib", "/lib"):
        dirs += [os.path.join(root, multiarch)] if multiarch else []
        dirs.append(root)
    return dirs + ["/usr/lib64", "/lib64"]


def find(name: str, dirs: list[str] | None = None) -> str | None:
    """Path of an installed `name` allocator library ("tcmalloc" or "jemalloc"), or None."""
    for directory in _library_dirs() if dirs is None else dirs:
        for soname in _LIBRARIES[name]:
            matches = sorted(glob.glob(os.path.join(directory, soname + "*")))
            if matches:
                return matches[0]
    return None


def _old_glibc() -> bool:
    name, version = platform.libc_ver()
    if name != "glibc" or not version:
        return False
    return tuple(int(part) for part in version.split(".")[:2]) < (2, 39)


def keeps_freed_blocks(environ: dict[str, str] | None = None) -> bool:
    """Whether a process started with `environ` (default: this one's) keeps freed CPU tensor blocks instead of
    reusing them: glibc before 2.39 as its malloc, no replacement in LD_PRELOAD, and no fixed mmap threshold
    (MALLOC_MMAP_THRESHOLD_ or the glibc.malloc.mmap_threshold tunable, which maps larger blocks on their own and
    unmaps them when freed). Only glibc 2.36 is measured; later glibc and other allocators are assumed to reuse."""
    environ = os.environ if environ is None else environ
    threshold = "MALLOC_MMAP_THRESHOLD_" in environ or "mmap_threshold" in environ.get("GLIBC_TUNABLES", "")
    return _old_glibc() and not threshold and preloaded(environ) is None


def preloaded(environ: dict[str, str] | None = None) -> str | None:
    """The malloc replacement LD_PRELOAD names ("tcmalloc", "jemalloc", "mimalloc" or its path), or None."""
    preload = (os.environ if environ is None else environ).get("LD_PRELOAD", "")
    for entry in preload.replace(":", " ").split():
        base = os.path.basename(entry)
        for known in ("tcmalloc", "jemalloc", "mimalloc"):
            if known in base:
                return known
    return None


def choose(environ: dict[str, str] | None = None, dirs: list[str] | None = None) -> str | None:
    """The library path a model-loading command should restart with, or None to run as started.

    Raises ConfigError when GRPOKIT_ALLOCATOR names a library that is not there or a value it does not know."""
    environ = os.environ if environ is None else environ
    choice = environ.get(ENV, "auto").strip() or "auto"
    if platform.system() != "Linux" or environ.get(_RESTARTED) or choice == "system":
        return None
    if choice in _LIBRARIES:
        path = find(choice, dirs)
        if path is None:
            raise ConfigError(f"{ENV}={choice}, but no {' or '.join(_LIBRARIES[choice])} is installed here. Install "
                              f"it ({_INSTALL[choice]}), or set {ENV}=system to run on the C library's allocator")
        return None if preloaded(environ) == choice else path
    if os.sep in choice:
        if not os.path.isfile(choice):
            raise ConfigError(f"{ENV}={choice}: no such file. Name an allocator's shared library (for example "
                              f"{_LIBRARIES['tcmalloc'][0]}'s path), tcmalloc, jemalloc, system or auto")
        return choice
    if choice != "auto":
        raise ConfigError(f"{ENV}={choice!r} is not an allocator grpokit knows: use auto (the default), system, "
                          "tcmalloc, jemalloc, or the path of an allocator's shared library")
    return find("tcmalloc", dirs) if keeps_freed_blocks(environ) else None


def restart_with(library: str) -> None:
    """exec this same command again with `library` first in LD_PRELOAD (does not return)."""
    environ = dict(os.environ)
    environ["LD_PRELOAD"] = " ".join(part for part in (library, environ.get("LD_PRELOAD", "")) if part)
    environ[_RESTARTED] = library
    environ.setdefault(_REPORT_THRESHOLD, str(1 << 40))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)


def in_use() -> str:
    """The allocator this process runs on: the library mapped into it, else the C library's ("glibc 2.36")."""
    try:
        with open("/proc/self/maps") as maps:
            mapped = maps.read()
    except OSError:  # no procfs (macOS): the system's malloc
        mapped = ""
    for known in ("tcmalloc", "jemalloc", "mimalloc"):
        if f"lib{known}" in mapped:
            return known
    name, version = platform.libc_ver()
    return f"{name} {version}".strip() or "the system's malloc"


def release_free_memory() -> bool:
    """Return the allocator's free pages to the operating system where it is tcmalloc (MallocExtension's
    ReleaseFreeMemory); returns whether it did. tcmalloc otherwise keeps freed spans resident and splits them for
    later allocations: after the sampler's MKL-packed weight copies (allocated by torch at 2-9x their size, written
    at about their size), the RSS of a float32 SmolLM2-135M process after each of six generations grew from 1.69 to
    2.55 GB; with a release after each it stayed at 1.14-1.17 GB (benchmarks/RESULTS.md). glibc returns such blocks
    by itself (it maps them apart); other allocators are left alone."""
    release = _tcmalloc_release()
    if release is None:
        return False
    release()
    return True


@functools.cache
def _tcmalloc_release():
    if in_use() != "tcmalloc":
        return None
    try:
        function = ctypes.CDLL(None).MallocExtension_ReleaseFreeMemory
    except (AttributeError, OSError):  # an old tcmalloc without the C entry point
        return None
    function.restype, function.argtypes = None, []
    return function


def describe() -> str:
    """One line for a run's summary: the allocator in use and how to change it."""
    current = in_use()
    if current.startswith("glibc") and keeps_freed_blocks():
        how = (f"{ENV}=system keeps it" if os.environ.get(ENV, "auto") not in ("", "auto")
               else f"install tcmalloc ({_INSTALL['tcmalloc']}) and grpokit runs on it")
        return (f"C allocator: {current}, which keeps freed CPU tensor memory (the peak RSS grows with the heap's "
                f"history, beyond what `grpokit plan` counts): {how}")
    return f"C allocator: {current} ({ENV} chooses: auto, system, tcmalloc, jemalloc or a library's path)"
