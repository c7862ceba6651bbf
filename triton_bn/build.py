"""Native builds: C++ sources compiled against the installed torch once per machine, never hanging.

``load_library(name, sources, ...)`` returns a loaded shared library of ``torch.ops`` registrations,
building it first if no build of it exists yet.

What a build is (its key): the bytes of its sources and headers, the compiler's identity (what
``$CXX --version`` prints), the flags, torch's version, commit and C++ ABI, Python's version and the CPU
(``-march=native`` code runs only on CPUs like the one it was built for). Paths are not: a second virtual
environment or checkout with the same torch and compiler finds the first one's build.

Where: ``TRITON_BN_BUILD_DIR``, else ``$XDG_CACHE_HOME/triton_bn/build`` (``~/.cache/triton_bn/build``).
A build is one file, ``<name>-<key>.so``, with its compiler output beside it in ``<name>-<key>.log`` and its
size and SHA-256 in ``<name>-<key>.sha256``. A library is loaded only when it matches them: a file cut short
(a full disk, a broken copy, a sync tool) would otherwise crash every process that loads it (SIGBUS), so it
is said and rebuilt instead.

Never hanging, whatever stops a build (SIGKILL, Ctrl-C, a test timeout, a full disk):
- the library is linked in a private folder and renamed into place when complete, so a half-written
  one is never loaded;
- one process builds a key at a time, holding an advisory lock (``fcntl.flock``) on ``<name>-<key>.lock``
  that the kernel releases when the process ends, however it ends: a dead builder blocks no one, its lock
  is taken over by the next process, which removes its leftover folder. The file names the holder (pid,
  host, start) for the message of a process that waits;
- a process that finds a live builder waits for it, says so, and gives up after ``TRITON_BN_BUILD_WAIT``
  seconds (default 900) with an error that names the holder and what to do;
- the sources compile one process per file, as many at once as there are cores (``TRITON_BN_BUILD_JOBS``
  to change it), with a progress line every 20 seconds.
"""
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from typing import Callable, List, Optional, Sequence

import torch

try:
    from . import settings
except ImportError:  # build.py loaded as a file of its own (tests/test_build.py's probe): settings.py beside it
    import importlib.util
    _spec = importlib.util.spec_from_file_location(
        "triton_bn_settings", os.path.join(os.path.dirname(os.path.abspath(__file__)), "settings.py"))
    settings = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(settings)

try:
    import fcntl
except ImportError:  # not POSIX: an exclusive lock file, taken over when its holder is gone (same host)
    fcntl = None

PROGRESS_EVERY = 20.0  # seconds between progress lines while compiling
CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")


def headers_of(*folders: str) -> List[str]:
    """The headers of these folders of ``csrc/`` (a library's own and those it includes, such as ``node/``, the
    autograd node both native libraries share): what a build's key reads besides its sources."""
    return sorted(os.path.join(CSRC, folder, name) for folder in folders
                  for name in os.listdir(os.path.join(CSRC, folder)) if name.endswith(".h"))


class BuildError(RuntimeError):
    """A build that failed (the compiler's output is in ``log``) or could not start."""

    def __init__(self, message: str, log: Optional[str] = None):
        super().__init__(message)
        self.log = log


def build_dir() -> str:
    configured = settings.get("TRITON_BN_BUILD_DIR")
    if configured:
        return configured
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "triton_bn", "build")


def _say(text: str) -> None:
    print(f"triton_bn: {text}", file=sys.stderr, flush=True)


def compiler() -> str:
    return os.environ.get("CXX", "c++")


def _compiler_identity(cxx: str) -> str:
    try:
        done = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
        return f"{done.returncode}:{done.stdout.strip()}"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unusable: {exc}"  # the build then fails with the compiler's own error


def cpu_identity() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(line for line in f if line.startswith(("model name", "flags", "Features")))[:4096]
    except OSError:
        return platform.processor() or platform.machine()


def _torch_flags() -> List[str]:
    from torch.utils.cpp_extension import include_paths
    flags = [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-fPIC", "-std=c++20"]
    for path in include_paths():
        flags += ["-isystem", path]
    return flags


def _torch_libraries() -> List[str]:
    from torch.utils.cpp_extension import library_paths
    return [f"-L{path}" for path in library_paths()] + ["-lc10", "-ltorch_cpu", "-ltorch"]


def build_key(sources: Sequence[str], headers: Sequence[str], cflags: Sequence[str], ldflags: Sequence[str],
              cxx: str) -> str:
    digest = hashlib.sha1()
    for path in sorted(sources) + sorted(headers):
        with open(path, "rb") as f:
            digest.update(os.path.basename(path).encode() + b"\0" + f.read() + b"\0")
    digest.update("\0".join([*cflags, "|", *ldflags, _compiler_identity(cxx), torch.__version__,
                             str(torch.version.git_version), str(torch._C._GLIBCXX_USE_CXX11_ABI),
                             platform.python_version(), cpu_identity()]).encode())
    return digest.hexdigest()[:16]


# -- the lock ------------------------------------------------------------------------------------------------
class _Lock:
    """An exclusive lock on ``path`` that the kernel drops when its holder dies (flock); ``holder()`` reads
    who has it. Without fcntl (not POSIX): the file's existence is the lock, and a holder whose pid is gone
    on this host is taken over."""

    def __init__(self, path: str):
        self.path, self.fd = path, None

    def try_acquire(self) -> bool:
        if fcntl is not None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return False
        else:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder.get("host") == socket.gethostname() and not _alive(holder.get("pid", -1)):
                    _remove(self.path)  # a dead holder's lock: taken over on the next attempt
                return False
        self.fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        return True

    def holder(self) -> dict:
        try:
            with open(self.path) as f:
                return json.loads(f.read() or "{}")
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.fd is None:
            return
        if fcntl is None:
            _remove(self.path)
        else:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


# -- compiling ------------------------------------------------------------------------------------------------
def _compile(cxx: str, sources: Sequence[str], workdir: str, cflags: Sequence[str], ldflags: Sequence[str],
             library: str, log_path: str, what: str) -> None:
    """Compile each source to an object file in ``workdir``, several at once, then link ``library``
    there; every command and its output goes to ``log_path``. Raises BuildError (compiler processes
    killed) on a failure or an interruption."""
    jobs = settings.get("TRITON_BN_BUILD_JOBS") or os.cpu_count() or 1
    objects = [os.path.join(workdir, f"{i}-{os.path.basename(source)}.o") for i, source in enumerate(sources)]
    pending = list(zip(sources, objects))
    running, done, start, last_note = [], 0, time.monotonic(), time.monotonic()
    with open(log_path, "w") as log:
        try:
            while pending or running:
                while pending and len(running) < jobs:
                    source, obj = pending.pop(0)
                    command = [cxx, *cflags, "-c", source, "-o", obj]
                    output = open(obj + ".log", "w+")
                    running.append((subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT), command,
                                    output, source, time.monotonic()))
                time.sleep(0.1)
                for entry in list(running):
                    process, command, output, source, began = entry
                    if process.poll() is None:
                        continue
                    running.remove(entry)
                    output.seek(0)
                    log.write(" ".join(command) + "\n" + output.read() +
                              f"# {os.path.basename(source)}: {time.monotonic() - began:.1f} s\n")
                    output.close()
                    if process.returncode != 0:
                        raise BuildError(f"compiling {os.path.basename(source)} failed", log_path)
                    done += 1
                if time.monotonic() - last_note > PROGRESS_EVERY:
                    last_note = time.monotonic()
                    _say(f"... {what}: {last_note - start:.0f} s, {done} of {len(sources)} files compiled")
            command = [cxx, *objects, "-shared", *ldflags, "-o", library]
            linked = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            log.write(" ".join(command) + "\n" + linked.stdout + "\n")
            if linked.returncode != 0:
                raise BuildError("linking failed", log_path)
        except BaseException:
            for process, *_ in running:
                process.kill()
                process.wait()
            raise


def load_library(name: str, sources: Sequence[str], headers: Sequence[str] = (), extra_cflags: Sequence[str] = (),
                 extra_ldflags: Sequence[str] = (), what: str = "the native library", duration: str = "",
                 wait: Optional[float] = None, loader: Callable[[str], None] = torch.ops.load_library,
                 include_dirs: Sequence[str] = ()) -> str:
    """Load the build of ``sources`` (built first if this machine has none), returning its path.

    ``headers``: every header outside torch the sources include (their bytes are part of the key);
    ``include_dirs``: where they are (paths, so not part of the key). ``what`` names the library in
    messages, ``duration`` says how long a build takes ("about 80 s"). Raises
    BuildError when the build fails (the log's path in the message and in ``.log``) or when another live
    process has been building it for longer than ``wait`` seconds (``TRITON_BN_BUILD_WAIT``, 900)."""
    cxx = compiler()
    cflags = _torch_flags() + [flag for path in include_dirs for flag in ("-isystem", path)] + list(extra_cflags)
    ldflags = list(extra_ldflags) + _torch_libraries()
    key = build_key(sources, headers, list(extra_cflags), list(extra_ldflags), cxx)
    folder = build_dir()
    stem = os.path.join(folder, f"{name}-{key}")
    library, log_path = stem + ".so", stem + ".log"
    if _intact(library):
        loader(library)
        return library
    if os.path.exists(library):
        _say(f"{library} is not what its build wrote (size or checksum differ from {_fingerprint_path(library)}: "
             "a copy cut short, a full disk?); building it again")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise BuildError(f"can not create the build folder {folder} ({exc}); set TRITON_BN_BUILD_DIR to a "
                         "writable folder") from exc
    lock = _Lock(stem + ".lock")
    limit = settings.get("TRITON_BN_BUILD_WAIT") if wait is None else wait
    waited_since = None
    while not lock.try_acquire():
        holder = lock.holder()
        if waited_since is None:
            waited_since = time.monotonic()
            _say(f"another process (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since "
                 f"{holder.get('since', '?')}) is building {what} in {folder}; waiting for it (at most "
                 f"{limit:.0f} s)")
        if _intact(library):
            loader(library)
            return library
        if time.monotonic() - waited_since > limit:
            raise BuildError(f"waited {limit:.0f} s for process {holder.get('pid', '?')} on "
                             f"{holder.get('host', '?')} to build {what} in {folder}. If that process is gone "
                             f"(on another machine sharing this folder), delete {lock.path}; or set "
                             "TRITON_BN_BUILD_DIR to another folder, or TRITON_BN_BUILD_WAIT to wait longer")
        time.sleep(0.5)
    try:
        if _intact(library):  # built by the process we waited for
            loader(library)
            return library
        _remove(library)  # a damaged one (said above): no process may load it while we build
        for leftover in os.listdir(folder):  # folders of builders that died: no one else builds this key now
            if leftover.startswith(f"{name}-{key}.") and leftover.endswith(".tmp"):
                shutil.rmtree(os.path.join(folder, leftover), ignore_errors=True)
        workdir = f"{stem}.{os.getpid()}.tmp"
        start = time.monotonic()
        try:  # from the folder's creation on: a Ctrl-C at any point after it removes it (seen on a loaded CI machine)
            os.makedirs(workdir)
            _say(f"building {what} ({len(sources)} C++ files, {cxx}; once per machine for this source, torch, "
                 f"compiler and CPU{', ' + duration if duration else ''}) in {folder}; compiler output: {log_path}")
            _compile(cxx, sources, workdir, cflags, ldflags, os.path.join(workdir, "library.so"), log_path, what)
            _install(os.path.join(workdir, "library.so"), library)  # atomic: complete or absent
        except OSError as exc:
            raise BuildError(f"the build could not be written ({exc})", log_path) from exc
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        _say(f"built {what} in {time.monotonic() - start:.0f} s: {library}")
    finally:
        lock.release()
    loader(library)
    return library


# -- verifying a build -------------------------------------------------------------------------------------------
def _fingerprint(path: str) -> str:
    """``<size> <sha256>`` of a file: what the builder writes beside a library and a loader checks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"{os.path.getsize(path)} {digest.hexdigest()}"


def _fingerprint_path(library: str) -> str:
    return library[:-len(".so")] + ".sha256"


def _intact(library: str) -> bool:
    """Whether ``library`` is there and is what its builder wrote (size and checksum as recorded beside it)."""
    try:
        with open(_fingerprint_path(library)) as f:
            recorded = f.read().strip()
        return os.path.exists(library) and _fingerprint(library) == recorded
    except OSError:
        return False


def _install(built: str, library: str) -> None:
    """Put a complete build in place: its fingerprint first, then the library by an atomic rename, so that a
    library in place always has the fingerprint it must match."""
    fingerprint = _fingerprint_path(library)
    with open(built + ".sha256", "w") as f:
        f.write(_fingerprint(built) + "\n")
    os.replace(built + ".sha256", fingerprint)
    os.replace(built, library)


def log_tail(log: Optional[str], lines: int = 12) -> str:
    """The last lines of a build log, for an error message."""
    if not log:
        return ""
    try:
        with open(log, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""
