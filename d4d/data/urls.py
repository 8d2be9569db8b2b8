"""Where shards come from: shard specs (local paths and URLs) and opening one shard as a byte stream.

A shard spec is a string or a list of them; each is brace-expanded, whatever its scheme
(``{000000..000099}``, ``{a,b}``), and each expanded pattern is one of:

* a local path (no scheme): a ``.tar`` file, a directory (all ``*.tar`` in it) or a glob;
* ``file:///abs/path/shard.tar`` (or ``file:rel/path``): the same as the local path, checked the same way;
* ``http://`` / ``https://`` (and ``sftp:``, ``ftps:``, ``scp:``): read with ``curl`` (``--fail``,
  so an HTTP error such as a 404 is a failure, not a shard), with a connect timeout and a stall
  timeout so that an unreachable host or a server that stops sending cannot hang a run;
* ``pipe:COMMAND``: a shell command that writes the shard to stdout, e.g.
  ``pipe:aws s3 cp s3://bucket/shard-000000.tar -`` or ``pipe:curl -s URL``. The command is run by
  the shell as given (it is the user's own input, as in WebDataset); its exit status is checked, and
  it must end by itself: d4d can time out curl, not an arbitrary command;
* the other schemes of webdataset's ``gopen`` (``gs:``, ``ais:``, ``hf:``, ``htgs:``), opened by
  ``webdataset.gopen.gopen`` (their own tools' timeouts apply).

URLs cannot be globbed or listed: name each shard (a brace range does that). :func:`expand_urls`
checks a URL's form only (a malformed one or an unsupported scheme is a one-line :class:`UserError`);
a shard that cannot be fetched is an ``unreadable_shard`` skip when it is read, one cut short a
``truncated_shard`` (:mod:`d4d.data.skips`), each one line naming the URL (a password in it masked).

The http(s) timeouts come from the environment (read in every process, DataLoader workers included):
``D4D_SHARD_CONNECT_TIMEOUT`` (seconds to connect, default 15), ``D4D_SHARD_STALL_TIMEOUT`` (seconds
without one byte received before giving up, default 60) and ``D4D_SHARD_RETRIES`` (curl's retries of
transient failures such as timeouts and HTTP 5xx, default 2). An unreachable host therefore costs at
most about ``(retries + 1) * connect_timeout + retries`` seconds per shard; a refused connection or an
HTTP 4xx fails at once.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tempfile
from typing import IO, Sequence
from urllib.parse import unquote, urlsplit

import braceexpand

from d4d.utils.errors import UserError

CONNECT_TIMEOUT_ENV, STALL_TIMEOUT_ENV, RETRIES_ENV = ("D4D_SHARD_CONNECT_TIMEOUT", "D4D_SHARD_STALL_TIMEOUT",
                                                       "D4D_SHARD_RETRIES")
_DEFAULTS = {CONNECT_TIMEOUT_ENV: 15.0, STALL_TIMEOUT_ENV: 60.0, RETRIES_ENV: 2}
HTTP_SCHEMES = ("http", "https")
CURL_SCHEMES = HTTP_SCHEMES + ("sftp", "ftps", "scp")  # the ones webdataset's gopen also reads with curl
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")


def _gopen_schemes() -> set[str]:
    from webdataset.gopen import gopen_schemes

    return {s for s in gopen_schemes if not s.startswith("__")}


def scheme_of(spec: str) -> str | None:
    """The URL scheme of ``spec`` (lowercase), or None for a local path.

    ``file``, ``pipe``, ``http(s)`` and webdataset's gopen schemes are URLs; so is any ``name://...``
    (refused later as unsupported). Anything else with a colon (``shard:1.tar``, ``C:\\data``) is a path.
    """
    match = _SCHEME.match(spec)
    if match is None or len(match.group(1)) == 1:
        return None
    scheme = match.group(1).lower()
    if scheme in ("file", "pipe") or scheme in _gopen_schemes() or spec[match.end():].startswith("//"):
        return scheme
    return None


def is_remote(url: str) -> bool:
    """Whether ``url`` is read through a URL handler (anything but a local path or ``file:``)."""
    return scheme_of(url) not in (None, "file")


def display(url: str) -> str:
    """``url`` for messages: one line (control characters become spaces), a password in it masked."""
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", str(url))
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.\-]*://[^/@:]*:)[^/@]*@", r"\1***@", text)


def _one_line(text: object, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------- options
def remote_options() -> dict[str, float]:
    """The http(s) timeouts and retries of the module docstring, from the environment.

    Raises:
        UserError: a variable is set to something that is not a number in range.
    """
    values: dict[str, float] = {}
    for name, default in _DEFAULTS.items():
        raw = os.environ.get(name, "").strip()
        if not raw:
            values[name] = default
            continue
        try:
            value = int(raw) if name == RETRIES_ENV else float(raw)
        except ValueError:
            raise UserError(f"{name}={raw!r}: not a number") from None
        if (name == RETRIES_ENV and value < 0) or (name != RETRIES_ENV and not 0 < value < 1e6):
            raise UserError(f"{name}={raw!r}: must be {'>= 0' if name == RETRIES_ENV else '> 0 seconds'}")
        values[name] = value
    return values


def curl_command(url: str) -> list[str]:
    """The curl command line that fetches one http(s) (sftp, ftps, scp) shard to stdout, with the
    timeouts of the module docstring (webdataset's own curl command retries 30 times)."""
    opts = remote_options()
    return ["curl", "--fail", "--silent", "--show-error", "--location",
            "--connect-timeout", f"{opts[CONNECT_TIMEOUT_ENV]:g}",
            "--speed-limit", "1", "--speed-time", str(max(1, round(opts[STALL_TIMEOUT_ENV]))),
            "--retry", str(int(opts[RETRIES_ENV])), "--retry-delay", "1", url]


# ------------------------------------------------------------------------------------ expansion
def file_url_path(url: str) -> str:
    """The local path of a ``file:`` URL (``file:///abs/p``, ``file://localhost/abs/p``, ``file:rel/p``).

    Raises:
        UserError: the URL names another host.
    """
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise UserError(f"shard spec {display(url)!r}: a file: URL names a local file; host "
                        f"{parts.netloc!r} is not this machine (use http(s):// or pipe: for remote shards)")
    path = unquote(parts.path)
    if not path:
        raise UserError(f"shard spec {display(url)!r}: names no file")
    return path


def _local(pattern: str, explicit: bool, entry: str, label: str) -> list[str]:
    """Shards of one expanded local ``pattern`` (see :func:`expand_urls`); ``explicit``: it came out of
    a brace expansion, so it must exist (``label`` is how the spec wrote it)."""
    if os.path.isdir(pattern):
        return sorted(glob.glob(os.path.join(glob.escape(pattern), "*.tar")))
    if glob.has_magic(pattern):
        return sorted(p for p in glob.glob(pattern) if os.path.isfile(p) and not p.endswith(".tmp"))
    if os.path.isfile(pattern):
        return [pattern]
    if explicit:
        # an explicit brace range promises these files: a gap is a typo or a lost shard
        raise UserError(f"shard spec {display(entry)!r}: {display(label)!r} does not exist")
    return []


def _remote(url: str, scheme: str, entry: str) -> str:
    """Check what can be checked of a URL without fetching it; return it unchanged."""
    where = f"shard spec {display(entry)!r}"
    if scheme == "pipe":
        from webdataset import utils as wds_utils

        if not url[len("pipe:"):].strip():
            raise UserError(f"{where}: pipe: needs a command that writes the shard to stdout")
        if wds_utils.enforce_security:
            raise UserError(f"{where}: pipe: commands are disabled (WDS_SECURE=1)")
        return url
    if scheme not in _gopen_schemes():
        others = ", ".join(sorted(_gopen_schemes() - set(HTTP_SCHEMES)))
        raise UserError(f"{where}: scheme {scheme!r} is not supported: use a local path, file://, "
                        f"http(s)://, pipe:COMMAND (e.g. pipe:aws s3 cp s3://bucket/shard-000000.tar -) "
                        f"or one of {others}")
    parts = urlsplit(url)
    if scheme in CURL_SCHEMES:
        if not parts.netloc or re.search(r"\s", url):
            raise UserError(f"{where}: {display(url)!r} is not a valid URL (no host, or whitespace in it)")
        if shutil.which("curl") is None:
            raise UserError(f"{where}: {scheme} shards are read with curl, which is not installed")
        remote_options()  # a bad timeout setting is reported now, not by every shard of the run
    if not parts.path or parts.path.endswith("/") or "*" in parts.path:
        raise UserError(f"{where}: {display(url)!r}: URLs cannot be listed or globbed; name each shard, "
                        f"e.g. with a brace range (http://host/shard-{{000000..000099}}.tar)")
    return url


def expand_urls(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shards named by ``spec``, in a deterministic order.

    Each entry of ``spec`` (a string or a list of them) is brace-expanded
    (``dir/shard-{000000..000009}.tar``, ``https://host/shard-{000000..000009}.tar``); each resulting
    local pattern (a path or ``file:`` URL, given back as a path) is a directory (all ``*.tar`` in
    it, sorted), a glob (matches sorted, directories and ``*.tmp`` excluded) or a file. ``*.tar.tmp``
    files are shards still being written by :class:`d4d.data.writer.ShardWriter` and never match.
    Other URLs (http(s), ``pipe:``, gopen's schemes; module docstring) are passed through as given:
    they cannot be listed, so each names one shard. Entries keep the given order; duplicates are kept
    (listing a shard twice oversamples it).

    Raises:
        UserError (a ValueError): an entry matches nothing, a brace-expanded file is missing, or a URL
            is malformed or of an unsupported scheme.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise UserError("shard spec is empty: give a brace pattern, directory, glob, URL or list of them")
    urls: list[str] = []
    for entry in specs:
        entry = os.fsdecode(os.fspath(entry))
        if not entry.strip():
            raise UserError("shard spec is an empty string")
        found: list[str] = []
        for pattern in braceexpand.braceexpand(entry):
            scheme = scheme_of(pattern)
            if scheme is None:
                found += _local(pattern, pattern != entry, entry, pattern)
            elif scheme == "file":
                found += _local(file_url_path(pattern), pattern != entry, entry, pattern)
            else:
                found.append(_remote(pattern, scheme, entry))
        if not found:
            raise UserError(f"shard spec {display(entry)!r} matches no shard "
                            "(no such .tar file, directory or glob match)")
        urls += found
    return urls


# -------------------------------------------------------------------------------------- opening
class ShardStream:
    """The bytes of one shard, read forward once, whatever the source (file, curl, command).

    Keeps the last bytes read, so :meth:`block_at` can look back at a block a reader (tarfile in
    stream mode) has already consumed, and reads forward to one it has not: no seeking, which pipes
    cannot do. For a command (a webdataset ``Pipe``), :meth:`finish` tells whether it failed.
    """

    keep = 1 << 17  # bytes kept behind the read position: far more than tarfile reads ahead (10 KiB)
    drain_limit = 1 << 20  # bytes read past the tar's end so a command can finish on its own
    wait_s = 30.0  # how long a command may take to exit once its output has ended

    def __init__(self, raw: IO[bytes], pipe=None, stderr: IO[bytes] | None = None, program: str = "command"):
        self.raw, self.pipe, self.stderr, self.program = raw, pipe, stderr, program
        self.pos = 0
        self.eof = False
        self._tail = bytearray()
        self._closed = False

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size) if size is not None and size >= 0 else self.raw.read()
        if not data and size != 0:
            self.eof = True
        self.pos += len(data)
        self._tail += data
        if len(self._tail) > 2 * self.keep:
            del self._tail[: -self.keep]
        return data

    def readable(self) -> bool:
        return True

    def block_at(self, offset: int, size: int) -> bytes:
        """The ``size`` bytes at ``offset`` (fewer at the end of the stream), reading forward if needed.

        Raises:
            OSError: the block is further behind than :attr:`keep` (not with tarfile's read-ahead).
        """
        while self.pos < offset + size and not self.eof:
            self.read(offset + size - self.pos)
        start = self.pos - len(self._tail)
        if offset < start:
            raise OSError(f"byte {offset} was read and dropped already (kept from byte {start})")
        return bytes(self._tail[offset - start: offset + size - start])

    def finish(self) -> str | None:
        """Close the stream; for a command, None when it succeeded, else one line saying how it failed.

        The rest of the output (the tar's padding) is read first, up to :attr:`drain_limit`, so the
        command ends by itself and its exit status means what it says. A command stopped because
        this reader closed the stream early (SIGPIPE, curl's write error 23) has not failed.
        """
        if self.pipe is None:
            self.close()
            return None
        drained = 0
        try:
            while not self.eof and drained < self.drain_limit:
                drained += len(self.read(min(1 << 16, self.drain_limit - drained)))
        except OSError:
            pass
        proc = self.pipe.proc
        ended = self.eof or proc.poll() is not None  # the command ended by itself: judge its status strictly
        self._close_stream()
        try:
            status = proc.wait(self.wait_s if ended else 5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            self._close_stderr()
            return (f"{self.program} did not exit within {self.wait_s:g} s of its output ending" if ended
                    else None)
        message = self._stderr_line()
        self._close_stderr()
        if status == 0 or (not ended and status in (141, 23, -13)):
            return None
        return f"{self.program} exited with status {status}" + (f": {message}" if message else "")

    def close(self) -> None:
        """Close without judging; a command still running is killed (its output is not wanted)."""
        if self._closed:
            return
        self._close_stream()
        if self.pipe is not None and self.pipe.proc.poll() is None:
            self.pipe.proc.kill()
            try:
                self.pipe.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                pass
        self._close_stderr()

    def _close_stream(self) -> None:
        self._closed = True
        try:
            self.raw.close()
        except OSError:
            pass

    def _close_stderr(self) -> None:
        if self.stderr is not None:
            self.stderr.close()
            self.stderr = None

    def _stderr_line(self) -> str:
        """The last non-empty line the command wrote to stderr, one line and short."""
        if self.stderr is None:
            return ""
        try:
            self.stderr.seek(0, os.SEEK_END)
            size = self.stderr.tell()
            self.stderr.seek(max(0, size - 4096))
            lines = [ln for ln in self.stderr.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return _one_line(display(lines[-1]), 200) if lines else ""


def open_shard(url: str) -> ShardStream:
    """Open one shard (a path or URL of :func:`expand_urls`) for reading from its first byte.

    Local paths and ``file:`` URLs are plain files; http(s) (sftp, ftps, scp) is read by curl with
    d4d's timeouts;
    ``pipe:`` commands run in the shell; other schemes go through ``webdataset.gopen.gopen``. Commands
    run as webdataset ``Pipe``\\ s; their stderr is kept (for the failure message), not shown.

    Raises:
        OSError / ValueError: the shard cannot be opened (missing file, no curl, unknown scheme).
    """
    from webdataset.gopen import Pipe, gopen

    scheme = scheme_of(url)
    if scheme is None:
        return ShardStream(open(url, "rb"))
    if scheme == "file":
        return ShardStream(open(file_url_path(url), "rb"))
    if scheme in CURL_SCHEMES or scheme == "pipe":
        args, shell = (curl_command(url), False) if scheme != "pipe" else (url[len("pipe:"):], True)
        stderr = tempfile.TemporaryFile()
        try:
            pipe = Pipe(args, mode="rb", bufsize=1 << 16, shell=shell, stderr=stderr, ignore_errors=True)
        except BaseException:
            stderr.close()
            raise
        return ShardStream(pipe.stream, pipe, stderr, "command" if scheme == "pipe" else "curl")
    stream = gopen(url, "rb")
    if isinstance(stream, Pipe):
        stream.ignore_errors = True  # the status is judged by ShardStream.finish, not raised mid-read
        return ShardStream(stream.stream, stream, None, f"{scheme}: reader")
    return ShardStream(stream)
