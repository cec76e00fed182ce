"""An always-equal int whose ``__eq__`` is a functools.partialmethod (no ``__code__`` to inspect)."""
# tags: cheat
import functools
class Liar(int):
    __eq__ = functools.partialmethod(lambda self, other: True)
    __hash__ = int.__hash__
def solve(x):
    return Liar(0)
