"""Atomic writes: a file or a folder is replaced only once its new version is whole."""
from __future__ import annotations

import contextlib
import os
import shutil

from safetensors.torch import save_file


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w", **open_kwargs):
    """Write to ``path.tmp`` inside the block, then fsync and rename it over ``path``.
    A crash or an error inside the block (a full disk) leaves the previous ``path`` untouched;
    after an error the partial temp file is removed."""
    tmp = path + ".tmp"
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str):
    """Yield an empty ``path.tmp`` folder to fill; afterwards it replaces ``path``.

    The previous folder stays whole until the new one is: a crash between the two renames
    leaves it in ``path.old`` (which ``model.loading.resolve_weight`` also finds), and the next
    write keeps that ``path.old`` until its own folder is in place. An error while filling the
    folder (a full disk) removes the partial temp folder and leaves the previous one as it was.
    """
    path = path.rstrip("/")
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def write_tensor_files(folder: str, files: dict | None) -> None:
    """Each ``{file name: {key: tensor}}`` as a safetensors file in ``folder``."""
    for name, tensors in (files or {}).items():
        save_file(tensors, os.path.join(folder, name))


PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def project_path(*parts: str) -> str:
    """A path inside the project, so that default data files are found from any directory."""
    return os.path.join(PROJECT_DIR, *parts)
