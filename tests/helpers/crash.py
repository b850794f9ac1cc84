"""Run a training script with one fault at a chosen point, as a crash or a pre-emption would.

    python tests/helpers/crash.py FAULT script.py [its arguments...]
    forked.run(crash.run_fault, FAULT, "script.py", [its arguments...], out_dir=...)   # from a test


FAULT is KIND:K, counted in this process:
    kill-step:K      SIGKILL at the first backward of optimizer step K, counted from the run's start
                     (mid-step, before its update)
    kill-save:K      SIGKILL half-way through writing the K-th resume file
    kill-weights:K   SIGKILL between the two renames of the K-th weights-folder write
                     (the previous folder has moved to .old, the new one is not in place yet)
    term-step:K      SIGTERM at the first backward of step K (a pre-emption notice)
    int-step:K       SIGINT likewise (Ctrl-C)
    enospc-save:K    the K-th resume-file write fails with "No space left on device" part-way

Nothing in the project knows about this file: it patches torch.save, os.replace,
Tensor.backward and RunLogger.step from outside, then runs the script as ``__main__``.
"""
import errno
import io
import os
import runpy
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from training.logging import RunLogger  # noqa: E402


def main():
    run_fault(sys.argv[1], sys.argv[2], sys.argv[3:])


def run_fault(fault: str, script: str, args: list[str]) -> None:
    """Run ``script`` with ``args`` as ``__main__``, with ``fault`` (see above) injected."""
    kind, k = fault.split(":")
    k = int(k)
    done = {"step": None, "saves": 0, "dirs": 0, "fired": False}

    log_init, log_step = RunLogger.__init__, RunLogger.step

    def init(self, *a, **kw):
        done["step"] = kw["start_step"]                 # the step this run starts from (resumed or 0)
        return log_init(self, *a, **kw)

    def step(self, n, *a, **kw):
        done["step"] = n                                # steps done so far
        return log_step(self, n, *a, **kw)

    RunLogger.__init__, RunLogger.step = init, step

    if kind.endswith("-step"):
        sig = {"kill-step": signal.SIGKILL, "term-step": signal.SIGTERM, "int-step": signal.SIGINT}[kind]
        backward = torch.Tensor.backward

        def patched_backward(self, *a, **kw):
            if not done["fired"] and done["step"] == k - 1:      # step K-1 is done: this backward is step K's
                done["fired"] = True
                os.kill(os.getpid(), sig)
            return backward(self, *a, **kw)

        torch.Tensor.backward = patched_backward
    elif kind in ("kill-save", "enospc-save"):
        save = torch.save

        def patched_save(obj, f, *a, **kw):
            if hasattr(f, "write"):
                done["saves"] += 1
                if done["saves"] == k:
                    buf = io.BytesIO()
                    save(obj, buf, *a, **kw)
                    data = buf.getvalue()
                    f.write(data[: len(data) // 2])
                    f.flush()
                    if kind == "kill-save":
                        os.kill(os.getpid(), signal.SIGKILL)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), getattr(f, "name", None))
            return save(obj, f, *a, **kw)

        torch.save = patched_save
    elif kind == "kill-weights":
        replace = os.replace

        def patched_replace(src, dst, *a, **kw):
            if str(src).endswith(".tmp") and os.path.isdir(src):
                done["dirs"] += 1
                if done["dirs"] == k:
                    os.kill(os.getpid(), signal.SIGKILL)
            return replace(src, dst, *a, **kw)

        os.replace = patched_replace
    else:
        sys.exit(f"unknown fault {fault}")

    sys.argv = [script, *args]
    runpy.run_path(os.path.join(ROOT, script), run_name="__main__")


if __name__ == "__main__":
    main()
