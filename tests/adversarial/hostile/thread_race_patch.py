"""A thread with a 1 us switch interval that keeps re-patching the ``==`` checker and builtins."""
# tags: cheat
import builtins, math, sys, threading
sys.setswitchinterval(1e-6)
G = globals()
def patch():
    while True:
        G["__cogumi_eq__"] = lambda a, b: True
        builtins.abs = lambda x: 0
        math.isclose = lambda *a, **k: True
threading.Thread(target=patch, daemon=True).start()
def solve(x):
    s = 0
    for i in range(20000):
        s += i
    return 0
