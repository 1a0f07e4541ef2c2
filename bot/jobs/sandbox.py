"""Walls around one job's terraform: bubblewrap namespaces that show only the job's own files.

Terraform runs code and reads files chosen by a pull request before anyone reviewed
it. Under bubblewrap each terraform process gets its own pid, ipc, uts and mount
namespaces: of the bot's disk it sees the system's programs and libraries (read-only),
the terraform binary and CLI config (read-only), its checkout (read-write, `.git`
read-only) and its scratch dir (HOME and the plan file going in or out); a private
`/tmp`, and no other process in `/proc`. When the bot runs as root, terraform runs as
an unprivileged uid. The network stays open: providers need it, and egress is the
network's job.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("bubblewrap", "none")

# `nobody`: owns nothing of the bot's, and terraform needs no more.
JOB_UID = 65534

# What of the host's root a job needs to run programs and reach the network, bound read-only.
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_SYSTEM_ETC = ("/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf", "/etc/host.conf", "/etc/gai.conf",
               "/etc/ssl", "/etc/ca-certificates", "/etc/pki", "/etc/alternatives", "/etc/localtime",
               "/etc/protocols", "/etc/services", "/etc/passwd", "/etc/group")

# Fixed PATH for terraform and its provisioners (and where setpriv is found); the bot's own
# PATH may name directories (virtualenvs, home bins) the deployed code has no business seeing.
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"

HOW_TO_FIX = ("install bubblewrap (Debian/Ubuntu: `apt-get install bubblewrap`) on a host that allows user "
              "namespaces, send the jobs to runners, or set `terraform.sandbox: none` on purpose")


class SandboxError(RuntimeError):
    """The sandbox cannot be made on this host."""


@dataclass(frozen=True)
class JobFiles:
    """The only files of the bot's disk that one job's terraform sees."""

    checkout: Path  # read-write; its `.git` read-only (git runs outside, as the bot)
    scratch: Path  # read-write: HOME, and the plan file on its way in or out


@dataclass(frozen=True)
class Sandbox:
    """How terraform processes are confined; `kind` is `bubblewrap` or `none`."""

    kind: str = "bubblewrap"
    read_only: tuple[Path, ...] = ()  # more paths every job sees read-only (a provider mirror)
    read_write: tuple[Path, ...] = ()  # paths every job may write: trials' local state only
    bwrap: str = "bwrap"
    # Run as this uid when the bot is root (None: the bot's own uid, inside a user namespace).
    uid: int | None = field(default_factory=lambda: JOB_UID if os.geteuid() == 0 else None)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SandboxError(f"terraform.sandbox must be one of {', '.join(KINDS)}, not {self.kind!r}")

    @property
    def confines(self) -> bool:
        """Whether jobs run in a sandbox at all."""
        return self.kind == "bubblewrap"

    def check(self) -> None:
        """Make one sandbox now, so that a host that cannot is found at start, not at the first plan."""
        if not self.confines:
            return
        if shutil.which(self.bwrap) is None:
            raise SandboxError(f"bubblewrap ({self.bwrap}) is not installed: {HOW_TO_FIX}")
        if self.uid is not None and shutil.which("setpriv", path=SAFE_PATH) is None:
            raise SandboxError("setpriv (util-linux) is not installed; the bot runs as root and needs it to run "
                               f"jobs as uid {self.uid}")
        missing = [str(path) for path in self.read_only if not Path(path).exists()]
        if missing:
            raise SandboxError(f"terraform.sandbox_read_only names paths that do not exist: {', '.join(missing)}")
        argv = self._wrap(["/bin/true"], [], [], Path("/"))
        try:
            done = subprocess.run(argv, capture_output=True, timeout=30, env={"PATH": SAFE_PATH})
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SandboxError(f"bubblewrap did not run: {exc}: {HOW_TO_FIX}") from None
        if done.returncode != 0:
            said = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no message"]
            raise SandboxError(f"bubblewrap cannot make a sandbox here ({said[0]}): {HOW_TO_FIX}")

    def command(self, argv: Sequence[str], files: JobFiles, cwd: Path, visible: Iterable[Path] = ()) -> list[str]:
        """`argv`, started in `cwd`, wrapped so that it sees only `files`, the system and `visible` (read-only)."""
        if not self.confines:
            return list(argv)
        read_only = _binds((*visible, *self.read_only))
        writable = _binds((*self.read_write, files.checkout, files.scratch))
        # The bot runs git here after the job: a `.git/config` written by plan-time code would
        # run commands as the bot (core.fsmonitor, hooks).
        git = files.checkout / ".git"
        return self._wrap(list(argv), read_only, writable, Path(cwd), _binds([git] if git.exists() else []))

    def hand_over(self, files: JobFiles) -> None:
        """Give the job's files to the job's uid (when the bot is root), `.git` excepted."""
        if not self.confines or self.uid is None:
            return
        for top in (files.checkout, files.scratch):
            _chown_tree(top, self.uid, skip=top / ".git")

    def share(self) -> None:
        """Make the `read_write` paths, and give them to the job's uid (when the bot is root)."""
        for top in self.read_write if self.confines else ():
            Path(top).mkdir(parents=True, exist_ok=True)
            if self.uid is not None:
                _chown_tree(Path(top), self.uid, skip=None)

    def _wrap(self, argv: list[str], read_only: list[tuple[Path, Path]], writable: list[tuple[Path, Path]],
              cwd: Path, protected: Sequence[tuple[Path, Path]] = ()) -> list[str]:
        args = [self.bwrap, "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                "--hostname", "deploybot-job", "--die-with-parent"]
        if self.uid is None:
            args += ["--unshare-user", "--cap-drop", "ALL"]
        else:
            # Root makes the namespaces itself; setpriv then drops to the job's uid for good.
            args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
                     "--cap-add", "CAP_SETPCAP"]
        args += _system()
        made: set[Path] = {Path("/"), Path("/tmp")}
        for _, path in read_only + writable:
            # Bubblewrap run by root makes missing parents 0700; the job's uid must pass through them.
            for parent in reversed(path.parents):
                if parent not in made and not any(parent.is_relative_to(d) for d in _SYSTEM_DIRS):
                    args += ["--perms", "0755", "--dir", str(parent)]
                    made.add(parent)
            made.add(path)
        for option, binds in (("--ro-bind", read_only), ("--bind", writable), ("--ro-bind", protected)):
            for source, dest in binds:
                args += [option, str(source), str(dest)]
        args += ["--chdir", str(cwd), "--"]
        if self.uid is not None:
            args += ["setpriv", f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups",
                     "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs"]
        return args + argv


def _binds(paths: Iterable[Path]) -> list[tuple[Path, Path]]:
    """(source, where the job sees it) for each path: at the path as named and as resolved,
    so that a symlink on the way (a data dir on another disk) leads to the same place inside."""
    binds: list[tuple[Path, Path]] = []
    for path in paths:
        source = Path(os.path.realpath(path))
        for dest in dict.fromkeys((Path(os.path.abspath(path)), source)):
            binds.append((source, dest))
    return binds


def _system() -> list[str]:
    """The host's programs, libraries and network settings (read-only), and fresh /proc, /dev, /tmp."""
    args: list[str] = []
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):  # merged /usr: /bin -> usr/bin
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for path in _SYSTEM_ETC:
        args += ["--ro-bind-try", path, path]
    return args + ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/tmp"]


def _chown_tree(top: Path, uid: int, skip: Path | None) -> None:
    os.lchown(top, uid, uid)
    for root, dirs, names in os.walk(top):
        if skip is not None and Path(root) == top and skip.name in dirs:
            dirs.remove(skip.name)
        for name in dirs + names:
            os.lchown(os.path.join(root, name), uid, uid)


PR_SET_DUMPABLE = 4


def harden_process() -> None:
    """Terraform runs code from pull requests as our user: keep it out of our memory and environment.

    A non-dumpable process's /proc files (environ, mem) belong to root and it cannot
    be ptraced by processes of the same user. Linux only; elsewhere a no-op.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):
        pass
