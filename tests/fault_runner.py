"""`python tests/fault_runner.py ARGS`: `python -m vitprune ARGS` that SIGKILLs itself (and its
DataLoader workers) at a chosen point, as a crash would; used by the soak test.

    FAULT_KILL=step:N    right after the N-th training step of this process
    FAULT_KILL=write:N   in the N-th chunk written to any file by this process, half of it written
    FAULT_SIZES=a,b,c    the synthetic set with (train, val, test) = (a, b, c) images
    FAULT_PAUSE=N:PATH   after its N-th epoch is recorded (last.pt written): write PATH.paused,
                         then wait until PATH exists (another process's turn, deterministically)
"""
import os
import signal
import sys
import time

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(TESTS), TESTS]  # this checkout's vitprune (as `python -m` from its root), conftest
from conftest import descendants, small_data  # noqa: E402


def die():
    for pid in descendants(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.kill(os.getpid(), signal.SIGKILL)


def arm(kind: str, n: int):
    import vitprune.train as train
    from vitprune import files
    count = [0]
    if kind == "step":
        real_step = train.train_step

        def step(*args, **kwargs):
            out = real_step(*args, **kwargs)
            count[0] += 1
            if count[0] == n:
                die()
            return out
        train.train_step = step
    elif kind == "write":
        real_write = files.Writer.write

        def write(self, data):
            count[0] += 1
            if count[0] == n:
                view = memoryview(data).cast("B")
                self.f.write(view[:view.nbytes // 2])
                self.f.flush()
                die()
            return real_write(self, data)
        files.Writer.write = write


def pause_after(n: int, path: str):
    import vitprune.train as train
    real, count = train.end_epoch, [0]

    def end_epoch(*args, **kwargs):
        real(*args, **kwargs)
        count[0] += 1
        if count[0] == n:
            open(path + ".paused", "w").close()
            while not os.path.exists(path):
                time.sleep(0.05)
    train.end_epoch = end_epoch


def main():
    kind, n = os.environ.get("FAULT_KILL", "none:0").split(":")
    arm(kind, int(n))
    if os.environ.get("FAULT_PAUSE"):
        n, path = os.environ["FAULT_PAUSE"].split(":", 1)
        pause_after(int(n), path)
    if os.environ.get("FAULT_SIZES"):
        import vitprune.runtime as runtime
        runtime.load_data = small_data(tuple(int(x) for x in os.environ["FAULT_SIZES"].split(",")))
    from vitprune.__main__ import main as vitprune_main
    sys.argv = ["vitprune", *sys.argv[1:]]
    vitprune_main()


if __name__ == "__main__":
    main()
