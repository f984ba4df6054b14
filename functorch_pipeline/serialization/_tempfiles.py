"""Temporary files of atomic saves: how they are named, and removing stale ones.

# NOTE [temp files]
An atomic save writes ``.<name>.<host>-<pid>-<random>.tmp`` beside ``<name>`` and renames
it over ``<name>`` when complete (NOTE [atomic save]). A process killed mid-save leaves
that file behind; nothing else ever renames or removes it. :func:`clean_temp_files`
removes such leftovers, and must never remove a save that is still running, possibly in
another process or on another machine sharing the directory. A temp file is stale when

- its writer is known dead: the name records the writer's pid and a token of its host
  and pid namespace (a hash of the host name and ``/proc/self/ns/pid``); on the same host
  and namespace, a pid that no longer exists cannot be writing (a pid that was reused
  only makes us keep the file longer, never remove it early; not checked on Windows,
  where ``os.kill(pid, 0)`` would end the process); or
- it has not been modified for ``max_age`` seconds (default one hour; a running save
  writes every few milliseconds), which also covers files from other hosts and files
  from older versions of this library (``.<name>.<random>.tmp``, no pid).

Files of the calling process are never removed (another thread may be saving). Only
regular files matching these exact patterns are considered: nothing else in the
directory is touched, and symlinks are never followed.

A temp name is ~34 bytes longer than ``<name>``, so a long (valid) ``<name>`` would make it
exceed ``NAME_MAX`` (255 bytes on Linux, macOS and Windows file systems): a ``<name>``
of more than ``_MAX_TARGET`` bytes is recorded as its first bytes, ``~`` and 8 hex digits
of a hash of the whole name (``.<head>~<hash>.<host>-<pid>-<random>.tmp``). The rule is
fixed (not per file system), so every process names a target's temp files alike.
:func:`clean_temp_files` ``target=`` matches such a name when the glob can match a name
starting with ``<head>`` (and, for a glob without wildcards, when the hash agrees).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import re
import socket
import stat
import sys
import time

__all__ = ["clean_temp_files", "temp_prefix", "temp_target"]

_RAND = r"[a-z0-9_]{8}"  # tempfile.mkstemp's random part
_NEW = re.compile(rf"\.(?P<target>.+)\.(?P<host>[0-9a-f]{{8}})-(?P<pid>[0-9]{{1,10}})-{_RAND}\.tmp")
_OLD = re.compile(rf"\.(?P<target>.+)\.{_RAND}\.tmp")
_NAME_MAX = 255
# "." + target + "." + host(8) + "-" + pid(up to 10) + "-" + random(8) + ".tmp"
_MAX_TARGET = _NAME_MAX - (1 + 1 + 8 + 1 + 10 + 1 + 8 + 4)
_SHORT = re.compile(r"(?P<head>.*)~(?P<hash>[0-9a-f]{8})")


def _host_token() -> str:
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = ""
    return hashlib.blake2b(f"{socket.gethostname()}\0{ns}".encode(), digest_size=4).hexdigest()


_HOST = _host_token()


def _name_hash(basename: str) -> str:
    return hashlib.blake2b(os.fsencode(basename), digest_size=4).hexdigest()


def temp_target(basename: str) -> str:
    """How a temp file's name records its target ``basename``: the name itself, or a
    truncated name and a hash when the temp name would exceed ``NAME_MAX`` (NOTE [temp
    files]).

    Args:
      basename: the target's file name.

    Returns:
      ``basename``, or ``<head>~<8 hex digits>`` of at most ``_MAX_TARGET`` bytes.

    >>> temp_target("ckpt.safetensors")
    'ckpt.safetensors'
    >>> len(temp_target("x" * 250)), temp_target("x" * 250)[-9]
    (221, '~')
    """
    if len(os.fsencode(basename)) <= _MAX_TARGET:
        return basename
    head = basename
    while len(os.fsencode(head)) > _MAX_TARGET - 9:  # never splits a UTF-8 sequence
        head = head[:-1]
    return f"{head}~{_name_hash(basename)}"


def temp_prefix(basename: str) -> str:
    """The ``mkstemp`` prefix of a temp file for ``basename`` (NOTE [temp files]).

    Args:
      basename: the target's file name.

    Returns:
      ``.<target>.<host>-<pid>-``, with ``<target>`` from :func:`temp_target`; with
      ``mkstemp``'s 8 random characters and ``.tmp`` the name fits in 255 bytes.

    >>> temp_prefix("ckpt.safetensors").startswith(".ckpt.safetensors.")
    True
    """
    return f".{temp_target(basename)}.{_HOST}-{os.getpid()}-"


def _glob_could_match_prefix(head: str, pattern: str) -> bool:
    """Whether glob ``pattern`` (``fnmatch`` syntax) matches some name starting with
    ``head``: the pattern is run as a small automaton over ``head``."""
    tokens: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "[":
            j = i + 1
            if j < len(pattern) and pattern[j] == "!":
                j += 1
            if j < len(pattern) and pattern[j] == "]":
                j += 1
            while j < len(pattern) and pattern[j] != "]":
                j += 1
            if j < len(pattern):
                tokens.append(pattern[i : j + 1])
                i = j + 1
                continue
        tokens.append(c)
        i += 1

    def closure(states: set[int]) -> set[int]:
        out = set(states)
        for s in sorted(states):
            while s < len(tokens) and tokens[s] == "*":
                s += 1
                out.add(s)
        return out

    states = closure({0})
    for ch in head:
        nxt = set()
        for s in states:
            if s == len(tokens):
                continue
            tok = tokens[s]
            if tok == "*":
                nxt.add(s)
            elif tok == "?" or (len(tok) > 1 and fnmatch.fnmatchcase(ch, tok)) or tok == ch:
                nxt.add(s + 1)
        states = closure(nxt)
        if not states:
            return False
    return True


def _target_matches(recorded: str, target: str) -> bool:
    """Whether a temp file whose name records ``recorded`` (see :func:`temp_target`) may
    be one of a save to a name matching the glob ``target``."""
    if fnmatch.fnmatchcase(recorded, target):
        return True
    short = _SHORT.fullmatch(recorded)
    if short is None or len(os.fsencode(recorded)) < _MAX_TARGET - 4:
        return False  # not a truncated name
    if not any(c in target for c in "*?["):
        return temp_target(target) == recorded
    return _glob_could_match_prefix(short["head"], target)


def _pid_alive(pid: int) -> bool:
    if sys.platform == "win32":
        return True  # os.kill(pid, 0) would terminate it there: rely on the age rule
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists (another user's) or cannot tell: keep the file
    return True


def clean_temp_files(
    directory: str | os.PathLike[str],
    *,
    target: str | None = None,
    max_age: float = 3600.0,
) -> list[str]:
    """Remove stale temporary files left in ``directory`` by interrupted :func:`save` /
    :func:`atomic_write` calls (a kill, a power loss), and return their paths.

    A temp file is stale when its writer is known to be dead (same host, its pid gone)
    or it has not been modified for ``max_age`` seconds; see NOTE [temp files] (which
    also covers the shortened temp names of targets longer than ~220 bytes). Saves
    still running, in this process or another, are left alone, and no other file is
    touched. ``CheckpointManager`` calls this on its directory when created.

    Args:
      directory: the directory to clean (not recursive).
      target: only temp files of saves to file names matching this glob
        (e.g. ``"ckpt_*.safetensors"``); default all.
      max_age: seconds without modification after which a temp file counts as stale
        whatever its writer (``>= 0``).

    Returns:
      The removed paths, sorted.

    Raises:
      ValueError: a negative ``max_age``.
      OSError: ``directory`` cannot be listed.

    Notes:
      NOTE [temp files]: a save writes ``.<name>.<host>-<pid>-<random>.tmp`` and renames it; a
        killed save leaves that file behind, and ``clean_temp_files`` removes only stale ones, never
        a save still running.

    Example:
      >>> import tempfile, os, subprocess, sys
      >>> d = tempfile.mkdtemp()
      >>> pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
      ...                      capture_output=True, text=True).stdout.strip()  # a dead pid
      >>> dead = f".ckpt.safetensors.{_HOST}-{pid}-abcd1234.tmp"
      >>> for name in (dead, "notes.tmp"):
      ...     open(os.path.join(d, name), "wb").close()
      >>> [os.path.basename(p) for p in clean_temp_files(d)] == [dead]
      True
      >>> os.listdir(d)
      ['notes.tmp']
    """
    if not isinstance(max_age, (int, float)) or not max_age >= 0:
        raise ValueError(
            f"clean_temp_files(directory): `max_age` must be >= 0 seconds, got {max_age!r}"
        )
    directory = os.fspath(directory)
    now = time.time()
    removed = []
    me = os.getpid()
    for name in os.listdir(directory):
        m = _NEW.fullmatch(name)
        old = None if m else _OLD.fullmatch(name)
        match = m or old
        if match is None or (target is not None and not _target_matches(match["target"], target)):
            continue
        if m and m["host"] == _HOST and int(m["pid"]) == me:
            continue  # ours: maybe a save running in another thread
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue  # renamed into place or removed meanwhile
        if not stat.S_ISREG(st.st_mode):
            continue
        dead = m is not None and m["host"] == _HOST and not _pid_alive(int(m["pid"]))
        if dead or now - st.st_mtime >= max_age:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(path)
    return sorted(removed)
