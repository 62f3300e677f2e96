"""A quiet console for ``loongforge run``: what the libraries say goes to the run's log file.

Inside :func:`quiet_console`, for the length of the run:

- a Python warning raised from code outside the LoongForge packages (megatron-core's "Transformer
  Engine and Apex are not installed", deprecations, a ``SyntaxWarning`` while compiling a
  library) is written to ``<output_dir>/run.log`` instead of stderr; our own warnings still show;
- log records of every other library (megatron-core's ``logging`` messages, torch's own log
  handler, e.g. "No CUDA runtime is found") go to the same file; records of ``loongforge*``
  loggers at WARNING and above still show on stderr;
- ``LOONGFORGE_VERBOSE=1`` also prints everything on stderr, as without this module.

Only the standard hooks are used (``warnings.showwarning``, a handler on the root logger,
torch's log handler swapped for a file handler); all are restored when the context exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path

ENV_VERBOSE = "LOONGFORGE_VERBOSE"
LOG_NAME = "run.log"


def verbose() -> bool:
    return os.environ.get(ENV_VERBOSE, "").strip().lower() not in ("", "0", "false", "no")


def _our_dirs() -> tuple[str, ...]:
    """Source directories of the imported LoongForge packages (the core and the plugins)."""
    dirs = []
    for name, module in list(sys.modules.items()):
        if "." not in name and name.startswith("loongforge") and getattr(module, "__file__", None):
            dirs.append(str(Path(module.__file__).parent) + os.sep)
    return tuple(dirs)


class _OursOrVerbose(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return verbose() or record.name.split(".")[0].startswith("loongforge")


class RunLog:
    """``output_dir/run.log``, held in memory until :meth:`open` (so that a run refused before it
    starts creates no output directory), then appended to line by line."""

    def __init__(self, path: Path):
        self.path, self._held, self._file = path, [], None

    def write(self, text: str) -> None:
        if self._file is None:
            self._held.append(text)
        else:
            self._file.write(text)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def open(self) -> None:
        """Create the file (and its directory) and write what was held."""
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - closed by close()
            self._file.write("".join(self._held))
            self._held.clear()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    @property
    def written(self) -> bool:
        return self._file is not None and self.path.stat().st_size > 0


@contextlib.contextmanager
def quiet_console(output_dir: str | os.PathLike, deferred: bool = False):
    """Route third-party warnings and library log messages to ``output_dir/run.log``; yields the
    :class:`RunLog`. ``deferred``: the file is created only once the caller calls ``.open()``
    (what was logged before is kept in memory until then, and dropped if it never is)."""
    import torch  # noqa: F401 - torch installs its log handler on import; it is redirected below

    rank = os.environ.get("RANK", "0")
    echo = verbose()
    log = RunLog(Path(output_dir) / LOG_NAME)
    if not deferred:
        log.open()
    with contextlib.ExitStack() as undo:
        undo.callback(log.close)
        ours = _our_dirs()
        shown = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            log.write(f"[rank {rank}] " + warnings.formatwarning(message, category, filename, lineno, line))
            if echo or str(filename).startswith(ours):
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = showwarning
        undo.callback(setattr, warnings, "showwarning", shown)

        root = logging.getLogger()
        to_file = logging.StreamHandler(log)
        to_file.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"))
        to_console = logging.StreamHandler(sys.stderr)
        to_console.setLevel(logging.WARNING)
        to_console.addFilter(_OursOrVerbose())
        for handler in (to_file, to_console):
            root.addHandler(handler)
            undo.callback(root.removeHandler, handler)
        if root.level > logging.INFO or root.level == logging.NOTSET:
            undo.callback(root.setLevel, root.level)
            root.setLevel(logging.INFO)

        # torch logs through its own stderr handler and does not propagate: a file handler with
        # its format replaces it (or joins it, when verbose)
        torch_logger = logging.getLogger("torch")
        for handler in list(torch_logger.handlers):
            twin = logging.StreamHandler(log)
            twin.setFormatter(handler.formatter)
            twin.setLevel(handler.level)
            torch_logger.addHandler(twin)
            undo.callback(torch_logger.removeHandler, twin)
            if not echo:
                torch_logger.removeHandler(handler)
                undo.callback(torch_logger.addHandler, handler)
        try:
            yield log
        finally:
            if rank == "0" and not echo and log.written:
                print(f"library messages: {log.path} ({ENV_VERBOSE}=1 prints them here)", file=sys.stderr)
