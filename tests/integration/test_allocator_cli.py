"""`grpokit train` restarts itself on tcmalloc where glibc would keep freed tensor memory (grpokit.runtime.allocator),
through the real entry point (`python -m grpokit`). `make test` installs tcmalloc (Debian's libtcmalloc-minimal4)."""

import os
import re

import pytest

from grpokit.runtime import allocator
from tests.conftest import run_cli

TINY = ["--set", "dataset=arithmetic", "--set", "max_steps=1", "--set", "num_generations=2",
        "--set", "per_device_train_batch_size=2", "--set", "max_completion_length=4", "--set", "save_steps=null",
        "--set", "report_to=none", "--set", "device=cpu", "--set", "output_dir=run"]
LINUX_GLIBC_BEFORE_2_39 = allocator.keeps_freed_blocks({})  # this machine's C library, with nothing preloaded


def _without_allocator_settings() -> dict[str, str]:
    return {key: "" for key in ("GRPOKIT_ALLOCATOR", "LD_PRELOAD") if key in os.environ}


@pytest.mark.skipif(not LINUX_GLIBC_BEFORE_2_39, reason="the restart applies on glibc before 2.39 only")
def test_train_restarts_itself_on_tcmalloc_and_keeps_its_arguments(tiny_model_dir, tmp_path):
    assert allocator.find("tcmalloc"), "tcmalloc is not installed: `make test` installs libtcmalloc-minimal4"
    result = run_cli("train", "--set", f"model={tiny_model_dir}", *TINY, cwd=tmp_path,
                     env=_without_allocator_settings())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "C allocator: tcmalloc" in result.stdout, result.stdout  # read from the process's own memory map
    # the arguments survived the exec
    assert "step 1/1" in result.stdout and (tmp_path / "run" / "final_model").is_dir()
    assert "tcmalloc: large alloc" not in result.stderr


@pytest.mark.slow  # over 10 s: the slow target (make test-slow; CI runs both)
@pytest.mark.skipif(not LINUX_GLIBC_BEFORE_2_39, reason="the restart applies on glibc before 2.39 only")
def test_system_keeps_glibc_and_the_summary_and_plan_say_what_that_costs(tiny_model_dir, tmp_path):
    env = {**_without_allocator_settings(), "GRPOKIT_ALLOCATOR": "system"}
    result = run_cli("train", "--set", f"model={tiny_model_dir}", *TINY, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    line = re.search(r"^C allocator: glibc .*$", result.stdout, re.M)
    assert line and "keeps freed CPU tensor memory" in line.group(0), result.stdout
    assert "GRPOKIT_ALLOCATOR=system keeps it" in line.group(0)
    planned = run_cli("plan", "--set", f"model={tiny_model_dir}", *TINY, cwd=tmp_path, env=env)
    assert planned.returncode == 0, planned.stderr
    assert "`grpokit train` here runs on glibc < 2.39" in planned.stdout
    assert "freed memory of the note above not counted" in planned.stdout
    default = run_cli("plan", "--set", f"model={tiny_model_dir}", *TINY, cwd=tmp_path,
                      env=_without_allocator_settings())
    assert "glibc < 2.39" not in default.stdout and "not counted)" not in default.stdout, default.stdout  # tcmalloc


@pytest.mark.parametrize("value, says",
                         [("/no/such/libtcmalloc.so", "GRPOKIT_ALLOCATOR=/no/such/libtcmalloc.so: no such file"),
                          ("tcmaloc", "GRPOKIT_ALLOCATOR='tcmaloc' is not an allocator grpokit knows")])
def test_a_bad_allocator_setting_stops_before_loading_anything(tiny_model_dir, tmp_path, value, says):
    result = run_cli("train", "--set", f"model={tiny_model_dir}", *TINY, cwd=tmp_path, env={"GRPOKIT_ALLOCATOR": value})
    assert result.returncode == 2 and f"grpokit: error: {says}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()
