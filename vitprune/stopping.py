"""Stopping a run on request: SIGINT (Ctrl-C) or SIGTERM asks the loop to stop at the next step
boundary, where it saves its position; under torchrun every process agrees on the step."""
import contextlib
import os
import shlex
import signal
import sys
import threading

import torch
import torch.distributed as dist


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived: the loop stops at the step boundary where it is raised."""


class StopRequest:
    """SIGINT and SIGTERM ask the loop to stop at the next step boundary; a second signal stops
    at once (last.pt then holds the last epoch)."""
    CHECK_EVERY = 16  # steps between the processes' agreement on stopping (DDP): one sync each

    def __init__(self):
        self.signum = None

    @contextlib.contextmanager
    def handling_signals(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signum is not None:
            print(f"\n{signal.Signals(signum).name} again: stopping now; last.pt holds the last finished epoch",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping at the next step (again to stop at once)",
              file=sys.stderr, flush=True)

    def requested(self, step: int, world: int, device) -> bool:
        """Whether to stop after `step`; every process gives the same answer at the same step."""
        if world == 1:
            return self.signum is not None
        if step % self.CHECK_EVERY:
            return False
        flag = torch.tensor(float(self.signum is not None), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def resume_command(out_dir: str, name: str, world: int) -> str:
    """The command line that continues a stopped run."""
    command = f"torchrun --nproc_per_node={world} -m vitprune" if world > 1 else "python -m vitprune"
    return command + f" run --resume --out_dir={shlex.quote(out_dir)} --name={shlex.quote(name)}"
