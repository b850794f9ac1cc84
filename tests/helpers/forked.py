"""Real child processes for the tests that need one (a signal, a kill -9, a crash), started in
milliseconds: each is forked from one server process that imported torch, transformers and the
scripts once (multiprocessing's forkserver), instead of a new interpreter that imports them again
(about 4 s each). The server itself never computes, so forking it is safe for torch's threads.

A child runs ``target(*args)`` with its stdout and stderr in files; ``run`` waits for it and
returns what a finished ``subprocess.run`` would: returncode (negative for a signal, the
``sys.exit`` status otherwise), stdout, stderr.
"""
import multiprocessing
import os
import runpy
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRELOAD = ["torch", "transformers", "peft", "train_dpo", "train_gpo", "train_grpo", "train_ppo", "train_reward",
           "train_sft", "helpers.crash"]
_context = None


def context():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


class Child:
    """A started child: ``pid``, ``wait(timeout)`` -> Finished."""

    def __init__(self, target, args, out_dir):
        os.makedirs(out_dir, exist_ok=True)
        n = len([f for f in os.listdir(out_dir) if f.startswith("child")])
        self.out, self.err = (os.path.join(out_dir, f"child{n}.{s}") for s in ("out", "err"))
        self.process = context().Process(target=_child_main,
                                         args=(self.out, self.err, dict(os.environ), target, args))
        self.process.start()
        self.pid = self.process.pid

    def poll(self):
        return self.process.exitcode

    def wait(self, timeout: float = 300) -> Finished:
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
            raise TimeoutError(f"child {self.pid} still ran after {timeout} s")
        return Finished(self.process.exitcode, *(open(p, encoding="utf-8", errors="replace").read()
                                                 for p in (self.out, self.err)))


def run(target, *args, out_dir, timeout: float = 300) -> Finished:
    return Child(target, args, out_dir).wait(timeout)


def _child_main(out, err, env, target, args):
    """In the child: stdout and stderr to their files (fd 1 and 2 too, for anything below Python),
    the parent's environment as it is now (not as the server started with), the project root as
    the working directory, then the target."""
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", closefd=False)
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", closefd=False)
    os.chdir(ROOT)
    target(*args)


def script(name: str, argv: list[str]) -> None:
    """``python name *argv`` in the child: the script run as ``__main__``."""
    sys.argv = [name, *argv]
    runpy.run_path(os.path.join(ROOT, name), run_name="__main__")
