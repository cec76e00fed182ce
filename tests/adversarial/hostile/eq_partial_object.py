"""An always-equal int whose ``__eq__`` is a C-level callable (functools.partial of operator.is_not)."""
# tags: cheat
import functools, operator
class Liar(int):
    __eq__ = functools.partial(operator.is_not, None)
    __hash__ = int.__hash__
def solve(x):
    return Liar(0)
