"""Fault injection at exact code points, for the adversarial test suite (inert unless its variable is set).

The owners' own hooks cover their modules' moments (``COGUMI_FAULT_KILL_AT_STEP`` in train.py,
``COGUMI_TEST_KILL_AFTER_SHARDS`` in merge.py, ``COGUMI_FAULT_KILL_AT`` in pipeline.py). This module reaches
the moments in between -- inside a library call, between two writes -- without touching their code:

  * ``COGUMI_FAULT_KILL_AFTER_CALL="package.module:function[@N]"``: SIGKILL the process right after the N-th
    (default first) return of ``package.module.function``. The function is wrapped where it is looked up,
    i.e. in ``package.module``'s namespace, as soon as that module is imported. Example:
    ``transformers.trainer:rotate_checkpoints@2`` kills a training run right after the Trainer deleted old
    checkpoints for the second time, before cogumi marks the new one complete.
  * ``COGUMI_FAULT_KILL_BEFORE_CALL`` is the same, killing when the N-th call starts.

How it gets in: the test writes a ``sitecustomize.py`` containing ``import cogumi.faults as f;
f.install_from_env()`` into a temporary directory and puts that directory first on ``PYTHONPATH`` of the
``cogumi`` subprocess (``sitecustomize_dir``). Nothing in cogumi imports this module.

Failure modes: a malformed spec raises ``ValueError`` at interpreter start (the subprocess fails loudly rather
than running without its fault); a function that is never called means no kill (the test sees the run finish).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import os
import signal
import sys
import threading
from pathlib import Path

ENV_AFTER = "COGUMI_FAULT_KILL_AFTER_CALL"
ENV_BEFORE = "COGUMI_FAULT_KILL_BEFORE_CALL"


def parse_spec(spec: str) -> tuple[str, str, int]:
    """``"pkg.mod:func@N"`` -> ("pkg.mod", "func", N)."""
    target, _, count = spec.partition("@")
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"fault spec {spec!r}: expected package.module:function[@N]")
    n = int(count) if count else 1
    if n < 1:
        raise ValueError(f"fault spec {spec!r}: N must be >= 1")
    return module, attr, n


def _kill_now() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def wrap(fn, *, when: str, n: int):
    """``fn`` that SIGKILLs the process at its n-th call (``when="before"``) or return (``"after"``)."""
    lock = threading.Lock()
    calls = [0]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with lock:
            calls[0] += 1
            mine = calls[0]
        if when == "before" and mine == n:
            _kill_now()
        result = fn(*args, **kwargs)
        if when == "after" and mine == n:
            _kill_now()
        return result

    return wrapper


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the target module's loader so the attribute is patched right after the
    module body ran (before anyone can take a reference to the original)."""

    def __init__(self, module: str, attr: str, when: str, n: int):
        self.module, self.attr, self.when, self.n = module, attr, when, n

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.module:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        original_exec = spec.loader.exec_module
        finder = self

        def exec_module(module):
            original_exec(module)
            finder.patch(module)

        spec.loader.exec_module = exec_module
        return spec

    def patch(self, module) -> None:
        fn = getattr(module, self.attr, None)
        if fn is None:
            raise ValueError(f"fault spec: {self.module} has no attribute {self.attr!r}")
        setattr(module, self.attr, wrap(fn, when=self.when, n=self.n))
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def install(spec: str, *, when: str = "after") -> None:
    module, attr, n = parse_spec(spec)
    if module in sys.modules:
        _PatchOnImport(module, attr, when, n).patch(sys.modules[module])
    else:
        sys.meta_path.insert(0, _PatchOnImport(module, attr, when, n))


def install_from_env() -> None:
    """Install the faults named by the environment (called from a test's sitecustomize.py)."""
    for env, when in ((ENV_AFTER, "after"), (ENV_BEFORE, "before")):
        spec = os.environ.get(env)
        if spec:
            install(spec, when=when)


def sitecustomize_dir(directory: str | os.PathLike) -> Path:
    """Write the ``sitecustomize.py`` that activates this module; put ``directory`` first on PYTHONPATH."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text("import cogumi.faults as _f\n_f.install_from_env()\n",
                                                encoding="utf-8")
    return directory
