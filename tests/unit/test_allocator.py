"""Choosing the C allocator a model-loading command restarts on (grpokit.runtime.allocator), with fake library
folders."""

from __future__ import annotations

import pytest

from grpokit.errors import ConfigError
from grpokit.runtime import allocator


@pytest.fixture
def libs(tmp_path):
    """A folder holding a (fake) tcmalloc and jemalloc, as a distribution installs them."""
    for name in ("libtcmalloc_minimal.so.4.5.10", "libtcmalloc_minimal.so.4", "libjemalloc.so.2"):
        (tmp_path / name).write_bytes(b"")
    return [str(tmp_path / "missing"), str(tmp_path)]


@pytest.fixture
def old_glibc(monkeypatch):
    monkeypatch.setattr(allocator, "_old_glibc", lambda: True)
    monkeypatch.setattr(allocator.platform, "system", lambda: "Linux")


def test_find_returns_the_first_installed_library(libs, tmp_path):
    assert allocator.find("tcmalloc", libs) == str(tmp_path / "libtcmalloc_minimal.so.4")
    assert allocator.find("jemalloc", libs) == str(tmp_path / "libjemalloc.so.2")
    assert allocator.find("tcmalloc", [str(tmp_path / "missing")]) is None


def test_auto_restarts_on_tcmalloc_only_where_glibc_keeps_freed_blocks(libs, tmp_path, old_glibc, monkeypatch):
    tcmalloc = str(tmp_path / "libtcmalloc_minimal.so.4")
    assert allocator.choose({}, libs) == tcmalloc
    assert allocator.choose({"GRPOKIT_ALLOCATOR": "auto"}, libs) == tcmalloc
    assert allocator.choose({}, [str(tmp_path / "missing")]) is None  # not installed: as started
    assert allocator.choose({"GRPOKIT_ALLOCATOR": "system"}, libs) is None
    assert allocator.choose({"LD_PRELOAD": "/opt/lib/libjemalloc.so.2"}, libs) is None  # the user's choice stands
    assert allocator.choose({"MALLOC_MMAP_THRESHOLD_": "1048576"}, libs) is None  # freed blocks already go back
    assert allocator.choose({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"}, libs) is None
    assert allocator.choose({"GRPOKIT_ALLOCATOR_RESTARTED": tcmalloc}, libs) is None  # never twice
    monkeypatch.setattr(allocator, "_old_glibc", lambda: False)  # glibc 2.39 and later, musl
    assert allocator.choose({}, libs) is None
    monkeypatch.setattr(allocator.platform, "system", lambda: "Darwin")
    assert allocator.choose({"GRPOKIT_ALLOCATOR": "tcmalloc"}, libs) is None


def test_a_named_allocator_is_used_on_any_libc(libs, tmp_path, monkeypatch):
    monkeypatch.setattr(allocator, "_old_glibc", lambda: False)
    monkeypatch.setattr(allocator.platform, "system", lambda: "Linux")
    assert allocator.choose({"GRPOKIT_ALLOCATOR": "jemalloc"}, libs) == str(tmp_path / "libjemalloc.so.2")
    assert allocator.choose({"GRPOKIT_ALLOCATOR": "tcmalloc"}, libs) == str(tmp_path / "libtcmalloc_minimal.so.4")
    assert allocator.choose({"GRPOKIT_ALLOCATOR": "tcmalloc", "LD_PRELOAD": "libtcmalloc.so.4"}, libs) is None
    path = str(tmp_path / "libjemalloc.so.2")
    assert allocator.choose({"GRPOKIT_ALLOCATOR": path}, libs) == path


@pytest.mark.parametrize("value, says", [
    ("tcmalloc", ["no libtcmalloc_minimal.so.4 or libtcmalloc.so.4 is installed", "libtcmalloc-minimal4",
                  "GRPOKIT_ALLOCATOR=system"]),
    ("jemalloc", ["no libjemalloc.so.2 is installed", "libjemalloc2"]),
    ("/no/such/libtcmalloc.so", ["GRPOKIT_ALLOCATOR=/no/such/libtcmalloc.so: no such file"]),
    ("tcmaloc", ["'tcmaloc' is not an allocator grpokit knows", "auto (the default), system, tcmalloc, jemalloc"]),
])
def test_an_allocator_that_is_not_there_is_an_error_saying_what_to_do(value, says, tmp_path, old_glibc):
    with pytest.raises(ConfigError) as caught:
        allocator.choose({"GRPOKIT_ALLOCATOR": value}, [str(tmp_path)])
    for text in says:
        assert text in str(caught.value)


def test_preloaded_reads_ld_preload_entries():
    assert allocator.preloaded({"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}) == "tcmalloc"
    assert allocator.preloaded({"LD_PRELOAD": "libfoo.so:/x/libjemalloc.so.2"}) == "jemalloc"
    assert allocator.preloaded({"LD_PRELOAD": "libfoo.so /x/libmimalloc.so"}) == "mimalloc"
    assert allocator.preloaded({"LD_PRELOAD": "/opt/tcmalloc-build/libfoo.so"}) is None  # the file, not the folder
    assert allocator.preloaded({}) is None
