"""Run untrusted Python (model-written code) in a limited child process: `run_python`, `run_many`.

Each run gets a throwaway working directory holding the program as a file; the interpreter starts
as `sys.executable -I -B -c BOOTSTRAP CONFIG` from an argument list (never a shell), in its own
session and process group, with an environment of four variables (no API keys leak in). The
bootstrap (`grpokit/rewards/sandbox_child.py`) sets the limits, installs the guard, then runs the program.
Outcomes are typed: passed (exit 0), failed (a Python exception: exit 1), timeout (wall or CPU
limit), crashed (a signal, the memory or output limit, any other exit), sandbox_error (the
sandbox could not run the program; callers treat it as missing, not as a failure of the code).

This is defence in depth for code written by a model that is being trained, not a security
boundary against a determined attacker the way gVisor, nsjail or a VM is. What holds, by layer
(probed once per process; `isolation().describe()` says which layers are active on a machine):

Enforced by the kernel, also against native code:
- resource limits in the child: RLIMIT_CPU (SIGXCPU, SIGKILL one second later), RLIMIT_AS (address
  space: allocations fail with MemoryError), RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE=0;
- the wall-clock limit and the output cap, enforced by the parent, which reads stdout and stderr
  through pipes (never more than `max_output_bytes` in memory) and SIGKILLs the process group;
- its own session and process group, SIGKILLed when the run ends, and (setpriv --pdeathsig)
  SIGKILL when the thread that started it dies, so a reward worker killed on timeout takes its runs along;
- with `unshare` (root, or unprivileged user namespaces): a network namespace (only a loopback
  device that is down: not even the host's 127.0.0.1 is reachable) and a PID namespace (when the run
  ends, the kernel kills every process in it, including ones that left the group with setsid());
- root, when the interpreter's files are readable by other users: the program runs as a fresh
  random uid that owns only its working directory, so the kernel refuses writes elsewhere, and
  RLIMIT_NPROC binds (it never binds root);
- root that cannot drop the uid (Python under a 0700 /root, as with pyenv): uid 0 with an empty
  capability bounding set and no_new_privs (setpriv): limits cannot be raised, no mounts, no access
  to other users' files, but files owned by root stay writable as far as the kernel is concerned;
- root, when a cgroup `pids` controller is writable: `pids.max` caps processes and threads, and
  every process in the cgroup is killed at the end;
- not root, inside a user namespace: RLIMIT_NPROC counts only the run's own processes.

Enforced only by the audit hook (`sys.addaudithook`, installed before the program runs: Python code
cannot remove it, but native code is not subject to it, e.g. a C extension the program imports or
bytecode crafted to corrupt memory; ctypes and `code.__new__` are refused for that reason):
- no socket connect/bind/sendto/sendmsg and no name lookups (where a network namespace exists the
  kernel blocks the network as well; Unix sockets named by a path, such as docker.sock, are not
  covered by a network namespace, only by the hook and, for a dropped uid, by file permissions);
- no exec of any program (os.exec*, os.system, subprocess, posix_spawn): a new program would run
  without the hook. os.fork only when `max_processes > 0` AND a kernel limit on processes is
  active here (cgroup or RLIMIT_NPROC that binds); otherwise it is refused (fail closed);
- files: writes only inside the working directory (and /dev/null); reads only under the
  interpreter's prefixes and sys.path, the working directory, the program's own /proc entry and
  `read_paths`, and no data file (.json, .jsonl, .gz, .csv, .parquet, ... : a package may ship a
  dataset with its answers) outside the working directory. Paths are resolved with realpath before
  any check, so symlinks and `..` out (`/proc/self/root/...`, `/proc/self/../..`) are caught; a race
  between the check and the open (another thread swapping a symlink) is not;
- no os.kill outside the run's PID namespace (or outside its own process where there is none), no
  raising of resource limits, no gc.get_objects/get_referrers/get_referents.

Not covered: disk use inside the working directory (RLIMIT_FSIZE caps each file, not their count);
CPU time is limited per process, but threads may use several cores until then; a program that
forks (when allowed) with no PID namespace can outlive the run if the parent is killed first.
A parent killed mid-run leaves its working directory (and an empty cgroup) behind; later runs
sweep those whose parent process is gone, once they are 10 minutes old.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

Outcome = Literal["passed", "failed", "timeout", "crashed", "sandbox_error"]

_CHILD_SOURCE = (Path(__file__).with_name("sandbox_child.py")).read_text()
_PROGRAM_NAME = "main.py"
_DEFAULT_READ_PATHS = ("/usr/share/zoneinfo", "/etc/localtime", "/dev/urandom", "/dev/null", "/dev/zero")
_MIB = 1024 * 1024
_PREFIX = "grpokit-sandbox-"  # + parent pid + "-": working directories and cgroups, so leftovers can be swept
_SWEEP_EVERY_S = 60.0
_STALE_AFTER_S = 600.0


@dataclass(slots=True, kw_only=True, frozen=True)
class SandboxLimits:
    wall_s: float = 10.0  # wall-clock seconds from start to kill
    cpu_s: float = 10.0  # CPU seconds per process (RLIMIT_CPU, rounded up to whole seconds)
    memory_mb: int = 1024  # address space per process (RLIMIT_AS); the interpreter itself takes ~30 MB
    max_processes: int = 0  # processes the program may fork; 0: none (os.fork refused)
    max_threads: int = 16  # threads, which the kernel counts with processes (RLIMIT_NPROC, pids.max)
    max_output_bytes: int = 1_000_000  # stdout + stderr together; more kills the run ("crashed")
    max_file_bytes: int = 16 * _MIB  # largest file the program may write (RLIMIT_FSIZE)
    max_open_files: int = 64  # RLIMIT_NOFILE
    read_paths: tuple[str, ...] = ()  # readable besides the interpreter, sys.path and the working directory

    def __post_init__(self) -> None:
        for name in ("wall_s", "cpu_s", "memory_mb", "max_output_bytes", "max_file_bytes", "max_open_files"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("max_processes", "max_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"SandboxLimits.{name} must be >= 0, got {getattr(self, name)!r}")


@dataclass(slots=True, kw_only=True, frozen=True)
class SandboxResult:
    outcome: Outcome
    returncode: int | None  # the process's exit code; negative: killed by that signal; None: never started
    stdout: str  # at most max_output_bytes (stdout and stderr together), decoded with errors replaced
    stderr: str
    wall_s: float
    detail: str  # one line: why this outcome (the exception, the signal, the limit)
    output_truncated: bool = False
    session_id: int | None = None  # the run's session and process group id (its first process), for checks
    workdir: str = ""  # the run's working directory (removed by now); every process of the run has it in argv


@dataclass(slots=True, kw_only=True, frozen=True)
class Isolation:
    """Which kernel layers this machine gives the sandbox (the audit hook is always installed)."""

    is_root: bool
    # argv before the interpreter: setpriv (parent death), unshare, setpriv (capabilities)
    launcher: tuple[str, ...] = ()
    dies_with_parent: bool = False  # SIGKILL when the thread that started the run dies
    user_namespace: bool = False  # non-root: namespaces come with a user namespace
    net_namespace: bool = False
    pid_namespace: bool = False
    drop_uid: bool = False  # root: the program runs as a fresh unprivileged uid
    drop_capabilities: bool = False  # root that cannot drop the uid: uid 0 with no capabilities
    cgroup_dir: str | None = None  # root: where per-run pids cgroups are made
    notes: tuple[str, ...] = ()

    @property
    def process_limit(self) -> str | None:
        """The kernel mechanism that caps the number of processes, or None (then forking is refused)."""
        if self.cgroup_dir:
            return "cgroup pids.max"
        if self.drop_uid:
            return "RLIMIT_NPROC (dedicated uid)"
        if self.user_namespace:
            return "RLIMIT_NPROC (user namespace)"
        return None

    def describe(self) -> str:
        user = "fresh unprivileged uid" if self.drop_uid else "root without capabilities" if self.drop_capabilities \
            else "root" if self.is_root else "the calling user"
        parts = [f"runs as {user}", f"network namespace={self.net_namespace}", f"PID namespace={self.pid_namespace}",
                 f"process limit={self.process_limit or 'none (fork refused)'}",
                 f"dies with its parent={self.dies_with_parent}"]
        return ", ".join(parts) + "".join(f"; {n}" for n in self.notes)


def run_python(code: str, *, limits: SandboxLimits | None = None, stdin: str = "") -> SandboxResult:
    """Run `code` as a Python program in a fresh sandbox and say how it ended."""
    return _run(code, limits or SandboxLimits(), stdin, isolation())


def run_many(codes: Sequence[str], limits: SandboxLimits | None = None, max_workers: int = 4,
             stdins: Sequence[str] | None = None) -> list[SandboxResult]:
    """`run_python` over `codes`, up to `max_workers` at once; results in the order of `codes`."""
    if stdins is not None and len(stdins) != len(codes):
        raise ValueError(f"run_many: {len(stdins)} stdins for {len(codes)} programs")
    if not codes:
        return []
    inputs = list(stdins) if stdins is not None else [""] * len(codes)
    iso = isolation()
    limits = limits or SandboxLimits()
    if max_workers <= 1 or len(codes) == 1:
        return [_run(c, limits, s, iso) for c, s in zip(codes, inputs, strict=True)]
    # threads only wait on pipes; each run is its own process
    with ThreadPoolExecutor(max_workers=min(max_workers, len(codes)), thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda cs: _run(cs[0], limits, cs[1], iso), zip(codes, inputs, strict=True)))


def run_connected(first: str, second: str, limits: SandboxLimits | None = None,
                  second_limits: SandboxLimits | None = None) -> tuple[SandboxResult, SandboxResult]:
    """Two programs, each in its own sandbox, joined by two pipes and nothing else.

    Each program finds `(read_fd, write_fd)` in its global `__grpokit_channel__`: what one writes to its
    write_fd the other reads from its read_fd. Neither can reach the other's working directory, files,
    memory, output or exit status (own uid where the machine gives one, own PID namespace, the audit
    hook's read rules). When one ends, the other reads end-of-file. Both start at once; each has its
    own limits (`second_limits` defaults to `limits`)."""
    iso = isolation()
    limits = limits or SandboxLimits()
    to_first_r, to_first_w = os.pipe()
    to_second_r, to_second_w = os.pipe()
    channels = (_Channel((to_first_r, to_second_w)), _Channel((to_second_r, to_first_w)))
    results: dict[int, SandboxResult] = {}

    def second_run() -> None:
        try:
            results[1] = _run(second, second_limits or limits, "", iso, channels[1])
        except BaseException as exc:  # noqa: BLE001 - reported as the run's sandbox_error
            results[1] = _sandbox_error(f"cannot run: {exc!r}", time.monotonic())
        finally:
            channels[1].close()

    thread = threading.Thread(target=second_run, name="sandbox-pair", daemon=True)
    try:
        thread.start()
    except BaseException:
        for channel in channels:
            channel.close()
        raise
    try:
        results[0] = _run(first, limits, "", iso, channels[0])
    finally:
        channels[0].close()
        thread.join()
    return results[0], results[1]


class _Channel:
    """One run's ends of the pipes to its partner: passed to its child, closed in this process exactly once."""

    def __init__(self, fds: tuple[int, int]):
        self.fds = fds
        self._open = True
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if not self._open:
                return
            self._open = False
            for fd in self.fds:
                try:
                    os.close(fd)
                except OSError:
                    pass


# ---------------------------------------------------------------------------------------------
# probing what this machine allows

_isolation: Isolation | None = None
_isolation_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _isolation_lock  # a fork (the reward runner's workers) while another thread probes must not deadlock
    _isolation_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def isolation() -> Isolation:
    """The kernel layers available here, probed on first use (a few short runs, ~0.4 s; inherited by forks)."""
    global _isolation
    with _isolation_lock:
        if _isolation is None:
            _isolation = _probe()
            log.info("sandbox isolation: %s", _isolation.describe())
        return _isolation


def _probe() -> Isolation:
    is_root = os.geteuid() == 0
    notes: list[str] = []
    # SIGKILL the run when the thread that started it dies (a reward worker killed on timeout, a crash),
    # so no run outlives its parent; the namespaces' supervisor takes the rest of the run with it
    setpriv = shutil.which("setpriv")
    pdeath: tuple[str, ...] = (setpriv, "--pdeathsig", "KILL", "--") if setpriv else ()
    if not (pdeath and _starts(pdeath)):
        pdeath = ()
        notes.append("no setpriv --pdeathsig: a run can outlive a parent that is killed")
    iso = Isolation(is_root=is_root, launcher=pdeath, dies_with_parent=bool(pdeath))
    unshare = shutil.which("unshare")
    if unshare is None:
        notes.append("no unshare binary: no namespaces")
    else:
        user = () if is_root else ("--user", "--map-current-user")
        for candidate, with_pid in (((*pdeath, unshare, *user, "--net", "--pid", "--fork", "--kill-child"), True),
                                    ((*pdeath, unshare, *user, "--net"), False)):
            if _starts(candidate):
                iso = replace(iso, launcher=candidate, user_namespace=bool(user), net_namespace=True,
                              pid_namespace=with_pid)
                break
        else:
            notes.append("unshare cannot create namespaces here (no privileges, no user namespaces)")
    if not is_root:
        return replace(iso, notes=tuple(notes))

    cgroup = _find_pids_cgroup()
    if cgroup is None:
        notes.append("no writable cgroup pids controller")
    iso = replace(iso, cgroup_dir=cgroup)
    # Dropping to another uid needs the interpreter's library readable by others (it is not when
    # Python lives under a 0700 /root, as with pyenv): try it on a program that imports common modules.
    trial_code = ("import json, re, math, random, collections, itertools, functools, heapq, typing, decimal, "
                  "fractions, hashlib, string\nprint('ok')")
    trial_limits = SandboxLimits(wall_s=30, cpu_s=30)
    trial = _run(trial_code, trial_limits, "", replace(iso, drop_uid=True))
    if trial.outcome == "passed" and trial.stdout.strip() == "ok":
        return replace(iso, drop_uid=True, notes=tuple(notes))
    notes.append(f"an unprivileged uid cannot import the standard library here ({trial.detail})")
    if setpriv is not None:
        capless = replace(iso, launcher=(*iso.launcher, setpriv, "--bounding-set=-all", "--inh-caps=-all",
                                         "--no-new-privs", "--"), drop_capabilities=True)
        trial = _run(trial_code, trial_limits, "", capless)
        if trial.outcome == "passed":
            return replace(capless, notes=tuple(notes))
        notes.append(f"setpriv cannot drop capabilities ({trial.detail})")
    notes.append("programs run as root with its capabilities")
    return replace(iso, notes=tuple(notes))


def _starts(launcher: tuple[str, ...]) -> bool:
    try:
        return subprocess.run([*launcher, sys.executable, "-I", "-c", "pass"], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _find_pids_cgroup() -> str | None:
    """A directory in which per-run cgroups with a pids controller can be made, or None."""
    try:
        own = [line.rstrip("\n").split(":", 2) for line in Path("/proc/self/cgroup").read_text().splitlines()]
        mounts = [line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    except OSError:
        return None
    for fields_ in mounts:
        sep = fields_.index("-")
        fstype, superopts = fields_[sep + 1], fields_[sep + 3] if len(fields_) > sep + 3 else ""
        mount_root, mount_point = fields_[3], fields_[4]
        if fstype == "cgroup" and "pids" in superopts.split(","):
            rel = next((p for _, ctl, p in own if "pids" in ctl.split(",")), None)
        elif fstype == "cgroup2":
            rel = next((p for hid, ctl, p in own if hid == "0" and ctl == ""), None)
        else:
            continue
        if rel is None:
            continue
        base = Path(mount_point) / os.path.relpath(rel, mount_root)
        if fstype == "cgroup2":
            try:
                if "pids" not in (base / "cgroup.subtree_control").read_text().split():
                    continue
            except OSError:
                continue
        trial = base / f"grpokit-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            trial.mkdir()
            (trial / "pids.max").write_text("8")
            trial.rmdir()
            return str(base)
        except OSError:
            try:
                trial.rmdir()
            except OSError:
                pass
    return None


# ---------------------------------------------------------------------------------------------
# one run


def _sandbox_error(detail: str, start: float, stderr: str = "") -> SandboxResult:
    return SandboxResult(outcome="sandbox_error", returncode=None, stdout="", stderr=stderr,
                         wall_s=time.monotonic() - start, detail=detail)


def _run(code: str, limits: SandboxLimits, stdin: str, iso: Isolation,
         channel: _Channel | None = None) -> SandboxResult:
    try:
        return _run_in_workdir(code, limits, stdin, iso, channel)
    finally:
        if channel is not None:  # on every path: a partner blocked on the pipe must see it end
            channel.close()


def _run_in_workdir(code: str, limits: SandboxLimits, stdin: str, iso: Isolation,
                    channel: _Channel | None) -> SandboxResult:
    start = time.monotonic()
    _sweep_stale(iso)
    try:
        tmp = tempfile.TemporaryDirectory(prefix=f"{_PREFIX}{os.getpid()}-", ignore_cleanup_errors=True)
    except OSError as exc:
        return _sandbox_error(f"cannot create a working directory: {exc}", start)
    cgroup: Path | None = None
    with tmp as workdir:
        try:
            uid = random.SystemRandom().randrange(1 << 20, (1 << 31) - 2) if iso.drop_uid else None
            Path(workdir, _PROGRAM_NAME).write_text(code, encoding="utf-8", errors="surrogatepass")
            if uid is not None:
                os.chown(workdir, uid, uid)
                os.chmod(workdir, 0o700)
            if iso.cgroup_dir:
                cgroup = Path(iso.cgroup_dir) / f"{_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
                cgroup.mkdir()
                # the supervisor and the program's first process, plus what the program may start
                (cgroup / "pids.max").write_text(str(2 + limits.max_processes + limits.max_threads))
        except OSError as exc:
            _remove_cgroup(cgroup)
            return _sandbox_error(f"cannot prepare the working directory: {exc}", start)
        try:
            return _execute(limits, stdin, iso, workdir, uid, cgroup, start, channel)
        finally:
            _remove_cgroup(cgroup)


_last_sweep = -math.inf


def _sweep_stale(iso: Isolation, *, force: bool = False, min_age_s: float = _STALE_AFTER_S) -> None:
    """Remove working directories and cgroups left by a parent that was SIGKILLed mid-run.

    The reward runner kills its worker on a timeout; the run's processes die with it (parent-death
    signal, PID namespace), but nobody removes its directory and cgroup. Only entries whose parent
    pid is gone and that are older than `min_age_s` are removed (another PID namespace may share /tmp).
    """
    global _last_sweep
    now = time.monotonic()
    if not force and now - _last_sweep < _SWEEP_EVERY_S:
        return
    _last_sweep = now
    places = [(Path(tempfile.gettempdir()), True)] + ([(Path(iso.cgroup_dir), False)] if iso.cgroup_dir else [])
    for place, is_workdir in places:
        try:
            entries = [e for e in os.scandir(place) if e.name.startswith(_PREFIX) and e.is_dir(follow_symlinks=False)]
        except OSError:
            continue
        for entry in entries:
            owner = entry.name[len(_PREFIX):].partition("-")[0]
            if not owner.isdigit() or _alive(int(owner)):
                continue
            try:
                if time.time() - entry.stat(follow_symlinks=False).st_mtime < min_age_s:
                    continue
                if is_workdir:
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.rmdir(entry.path)  # fails, and stays, while processes are still in it
            except OSError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _rlimits(limits: SandboxLimits, iso: Isolation) -> dict[str, tuple[int, int]]:
    cpu = max(1, math.ceil(limits.cpu_s))
    out = {
        "RLIMIT_CPU": (cpu, cpu + 1),
        "RLIMIT_AS": (limits.memory_mb * _MIB, limits.memory_mb * _MIB),
        "RLIMIT_FSIZE": (limits.max_file_bytes, limits.max_file_bytes),
        "RLIMIT_NOFILE": (limits.max_open_files, limits.max_open_files),
        "RLIMIT_CORE": (0, 0),
    }
    if iso.drop_uid:  # a fresh uid owns nothing else
        tasks = 1 + limits.max_processes + limits.max_threads
        out["RLIMIT_NPROC"] = (tasks, tasks)
    elif iso.user_namespace:  # counted in the namespace: unshare, supervisor, program
        tasks = 3 + limits.max_processes + limits.max_threads
        out["RLIMIT_NPROC"] = (tasks, tasks)
    return out


def _execute(limits: SandboxLimits, stdin: str, iso: Isolation, workdir: str, uid: int | None,
             cgroup: Path | None, start: float, channel: _Channel | None = None) -> SandboxResult:
    status_r, status_w = os.pipe()
    config = {
        "workdir": workdir, "program": _PROGRAM_NAME, "status_fd": status_w,
        "rlimits": _rlimits(limits, iso), "uid": uid, "gid": uid,
        "cgroup_procs": str(cgroup / "cgroup.procs") if cgroup else None,
        "allow_fork": limits.max_processes > 0 and iso.process_limit is not None,
        "pid_namespace": iso.pid_namespace,
        "read_paths": [*_DEFAULT_READ_PATHS, *limits.read_paths],
        "channel": list(channel.fds) if channel is not None else None,
    }
    argv = [*iso.launcher, sys.executable, "-I", "-B", "-c", _CHILD_SOURCE, json.dumps(config)]
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
    stdin_file = None
    try:
        if stdin:
            stdin_file = tempfile.TemporaryFile()
            stdin_file.write(stdin.encode("utf-8", errors="surrogatepass"))
            stdin_file.seek(0)
        try:
            proc = subprocess.Popen(argv, stdin=stdin_file if stdin_file else subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir, env=env,
                                    start_new_session=True, close_fds=True,
                                    pass_fds=(status_w, *(channel.fds if channel is not None else ())))
        except OSError as exc:
            os.close(status_r)
            return _sandbox_error(f"cannot start the interpreter: {exc}", start)
    finally:
        os.close(status_w)
        if channel is not None:  # the child holds them now; the partner must see end-of-file when it ends
            channel.close()
        if stdin_file is not None:
            stdin_file.close()
    try:
        stdout, stderr, total, stop = _collect(proc, limits, start)
    finally:
        _kill_all(proc, uid, cgroup)
    returncode = proc.returncode
    wall = time.monotonic() - start
    status = _read_all(status_r)
    os.close(status_r)
    truncated = total > limits.max_output_bytes
    out_text = stdout.decode("utf-8", errors="replace")
    err_text = stderr.decode("utf-8", errors="replace")

    def result(outcome: Outcome, detail: str) -> SandboxResult:
        return SandboxResult(outcome=outcome, returncode=returncode, stdout=out_text, stderr=err_text, wall_s=wall,
                             detail=detail, output_truncated=truncated, session_id=proc.pid, workdir=workdir)

    ready = b"R\n" in status
    if stop == "timeout":
        return result("timeout", f"wall-clock limit of {limits.wall_s:g} s")
    if stop == "output":
        return result("crashed", f"output limit: more than {limits.max_output_bytes} bytes")
    if not ready:
        return result("sandbox_error", f"the sandbox could not start the program (exit {returncode}): "
                                       f"{_last_line(err_text) or 'no message'}")
    signum = _signal_of(status, returncode)
    if signum == signal.SIGXCPU:
        return result("timeout", f"CPU time limit of {math.ceil(limits.cpu_s)} s")
    if signum is not None:
        name = signal.Signals(signum).name if signum in signal.valid_signals() else str(signum)
        why = " (CPU hard limit, memory, or the OOM killer)" if signum == signal.SIGKILL else ""
        return result("crashed", f"killed by {name}{why}")
    last = _last_line(err_text)
    if returncode == 0:
        return result("passed", "exit 0")
    if returncode == 1:
        if last.startswith("MemoryError"):
            return result("crashed", f"memory limit of {limits.memory_mb} MB (MemoryError)")
        return result("failed", last or "exit 1")
    return result("crashed", f"exit {returncode}" + (f": {last}" if last else ""))


def _collect(proc: subprocess.Popen, limits: SandboxLimits, start: float) -> tuple[bytes, bytes, int, str | None]:
    """Read stdout and stderr until both close, the deadline passes, or the output cap is exceeded."""
    deadline = start + limits.wall_s
    cap = limits.max_output_bytes
    buffers = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    total = 0
    stop: str | None = None
    exited_at: float | None = None
    with selectors.DefaultSelector() as sel:
        for pipe in (proc.stdout, proc.stderr):
            os.set_blocking(pipe.fileno(), False)
            sel.register(pipe.fileno(), selectors.EVENT_READ)
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                stop = "timeout"
                break
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > 1.0:
                break  # the program is gone; whatever still holds the pipes is killed below
            for key, _ in sel.select(timeout=min(deadline - now, 0.1)):
                try:
                    chunk = os.read(key.fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                room = cap - total
                if room > 0:
                    buffers[key.fd] += chunk[:room]
                total += len(chunk)
                if total > cap:
                    stop = "output"
                    break
            if stop:
                break
    if stop is None:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stop = "timeout"
    return bytes(buffers[proc.stdout.fileno()]), bytes(buffers[proc.stderr.fileno()]), total, stop


def _kill_all(proc: subprocess.Popen, uid: int | None, cgroup: Path | None) -> None:
    """SIGKILL the process group, then (where there is one) every process of the cgroup and of the uid."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if cgroup is not None or uid is not None:
        for _ in range(100):
            victims = _cgroup_pids(cgroup) | _uid_pids(uid)
            if not victims:
                break
            for pid in victims:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        log.warning("sandbox: process %d did not die after SIGKILL", proc.pid)
    for pipe in (proc.stdout, proc.stderr):
        pipe.close()


def _cgroup_pids(cgroup: Path | None) -> set[int]:
    if cgroup is None:
        return set()
    try:
        return {int(p) for p in (cgroup / "cgroup.procs").read_text().split()}
    except OSError:
        return set()


def _uid_pids(uid: int | None) -> set[int]:
    if uid is None:
        return set()
    found = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid == uid:
                found.add(int(entry.name))
        except OSError:
            pass
    return found


def _remove_cgroup(cgroup: Path | None) -> None:
    if cgroup is None:
        return
    for _ in range(100):  # rmdir fails while exiting processes are still being reaped
        try:
            cgroup.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)
    log.warning("sandbox: could not remove cgroup %s", cgroup)


def _read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    data = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def _signal_of(status: bytes, returncode: int | None) -> int | None:
    """The signal that ended the program: from the supervisor's report, else from a negative exit code."""
    for line in status.splitlines():
        if line.startswith(b"S") and line[1:].isdigit():
            return int(line[1:])
    if returncode is not None and returncode < 0:
        return -returncode
    return None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""
