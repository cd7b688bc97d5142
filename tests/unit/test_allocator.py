"""Choosing the C allocator a model-loading command restarts on (grpokit.runtime.allocator), with fake library
folders; returning tcmalloc's free memory after a generation, on the real library."""

from __future__ import annotations

import ast
import os
import platform
import subprocess
import sys

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


_RELEASE_PROBE = """
import torch
from grpokit.runtime import allocator
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) << 10
block = torch.ones(64 << 20)  # 256 MiB, written
del block
held = rss()
released = allocator.release_free_memory()
print(repr((allocator.in_use(), released, held - rss())))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and /proc are Linux's")
@pytest.mark.parametrize("preload", [True, False])
def test_release_free_memory_returns_tcmalloc_s_freed_pages(preload):
    """On tcmalloc a freed 256 MiB tensor stays resident until the release, which returns it; on glibc (which maps
    such a block apart and unmaps it on free) there is nothing to do and nothing is called."""
    library = allocator.find("tcmalloc")
    assert library, "tcmalloc is not installed: `make test` installs libtcmalloc-minimal4"
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GRPOKIT_ALLOCATOR")}
    if preload:
        env["LD_PRELOAD"] = library
    out = subprocess.run([sys.executable, "-c", _RELEASE_PROBE], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    name, released, freed = ast.literal_eval(out.strip().splitlines()[-1])
    assert name == ("tcmalloc" if preload else allocator.in_use())
    assert released is preload
    if preload:
        assert freed > 200 << 20, f"the release returned {freed >> 20} MiB of a freed 256 MiB tensor"


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="MKL's packed GEMM is only required of torch's x86-64 builds (test_cpu_linear.py)")
def test_generation_on_mkl_packed_copies_releases_them_once_freed(tiny_model, monkeypatch):
    """After a generation that packed weights for MKL, the engine asks the allocator to release free memory, once,
    after the packed copies (the lean decoder's) are gone; a generation that packed nothing does not ask."""
    import weakref

    from grpokit.models import cpu_linear, decoder
    from grpokit.rollout.base import SamplingParams
    from grpokit.rollout.torch_engine import TorchEngine

    model, tokenizer = tiny_model
    monkeypatch.setattr(cpu_linear, "cpu_vendor", lambda: "GenuineIntel")
    monkeypatch.setattr(cpu_linear, "AUTO_MIN_WEIGHT", 0)
    decoders, releases = [], []
    real_init = decoder.LeanDecoder.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        decoders.append((weakref.ref(self), self.mkl is not None))

    monkeypatch.setattr(decoder.LeanDecoder, "__init__", init)
    monkeypatch.setattr(allocator, "_tcmalloc_release",
                        lambda: lambda: releases.append([ref() is None for ref, _ in decoders]))
    prompts = [tokenizer(t)["input_ids"] for t in ("What is 2 + 3?", "Hi")]
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=1)
    TorchEngine(model, 0, cpu_linear="auto").generate(prompts, 4, params)
    assert [packed for _, packed in decoders] == [True]
    assert releases == [[True]], "one release, after the decoder and its packed copies were freed"
    TorchEngine(model, 0, cpu_linear="torch").generate(prompts, 4, params)
    assert len(releases) == 1
