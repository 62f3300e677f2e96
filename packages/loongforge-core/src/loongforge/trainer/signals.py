"""Stopping a run on request, and no process outliving it (no torch import at module level).

* SIGTERM or SIGINT (Ctrl-C): the current step finishes, every rank agrees to stop at the same
  step (one all-reduce of a flag per step), a complete checkpoint is saved and the run exits
  with :data:`EXIT_INTERRUPTED` (75) after one line naming the checkpoint; running the same
  command again (with the default ``checkpoint.load=auto``) resumes from it.
* A second signal exits at once (code 128 + signal number). Checkpoints are written to
  ``step_N.tmp`` and renamed, and ``latest`` is replaced atomically, so the last complete
  checkpoint stays loadable.
* Under ``--nproc-per-node``, torchrun forwards the signal to the workers and waits
  ``--shutdown-timeout`` seconds (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, default 30) before killing
  them: a save that takes longer needs a larger value.
* Descendants die with the run, also when it is killed with SIGKILL: workers started by
  ``loongforge run`` and the one helper process megatron-core's checkpoint writer spawns (a
  ``multiprocessing`` manager serving its write-results queue, started once per process, which
  lingered with no parent before) ask the kernel for SIGKILL when their parent dies
  (``prctl(PR_SET_PDEATHSIG)``, Linux).
"""

from __future__ import annotations

import os
import signal
import sys

#: exit code of a run stopped by SIGTERM/SIGINT after saving a complete checkpoint (EX_TEMPFAIL:
#: "try again": the same command resumes with checkpoint.load=auto)
EXIT_INTERRUPTED = 75

_PR_SET_PDEATHSIG = 1


class Interrupted(Exception):  # noqa: N818 - not an error: the requested stop
    """Raised by the trainer after the checkpoint of a requested stop is saved."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved: {checkpoint} "
                         "(a run with checkpoint.load=auto, the default, resumes from it)")


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent exits (Linux; else nothing)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return
    if os.getppid() != parent or parent == 1:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)


class StopOnSignal:
    """SIGTERM/SIGINT handlers for the training loop (main thread): ``requested()`` after a step
    says, identically on every rank, whether to stop and save."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, device=None, distributed: bool = True, verbose: bool = True):
        self.signum: int | None = None
        self.device, self.distributed, self.verbose = device, distributed, verbose
        self._previous: dict[int, object] = {}

    def install(self) -> StopOnSignal:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def raise_if_stopped(self, step: int, total: int, checkpoint) -> None:
        """After the stop's checkpoint is saved: :class:`Interrupted` unless the run was complete."""
        if self.signum is not None and step < total:
            raise Interrupted(self.signum, step, checkpoint)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # the second signal: now, leaving the last complete checkpoint
            os._exit(128 + signum)
        self.signum = signum
        if self.verbose:
                print(f"received {signal.Signals(signum).name}: finishing this step and saving a checkpoint "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)

    def requested(self) -> bool:
        """Whether any rank received a signal (an all-reduce: every rank gets the same answer)."""
        if not self.distributed:
            return self.signum is not None
        import torch
        import torch.distributed as dist

        flag = torch.tensor([0 if self.signum is None else self.signum], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signum is None:
            self.signum = int(flag.item())  # another rank's signal (torchrun forwards it to every worker)
        return self.signum is not None


def guard_checkpoint_writer() -> None:
    """Create megatron-core's write-results queue ourselves, served by a ``multiprocessing``
    manager that dies with this process (megatron creates the same queue on its first save,
    from a manager with no such guard). Called before the first save; idempotent.

    Depends on ``megatron.core.dist_checkpointing.strategies.filesystem_async._results_queue``
    (``tests/test_signals.py`` fails if megatron-core stops using it)."""
    import multiprocessing as mp

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is not None:
        return
    if not hasattr(filesystem_async, "_results_queue"):
        raise RuntimeError("megatron-core's filesystem_async has no _results_queue: update "
                           "loongforge.trainer.signals.guard_checkpoint_writer for this megatron-core version")
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=mp.get_context("spawn"))  # the context megatron-core uses
    manager.start(die_with_parent)  # shut down at exit by multiprocessing's finalizer
    filesystem_async._results_queue = manager.Queue()  # the proxy keeps the manager alive
