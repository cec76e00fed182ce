"""sys.settrace / setprofile to skip or neuter the assert lines."""
# tags: cheat
import sys
def tracer(frame, event, arg):
    frame.f_trace_lines = True
    return tracer
try:
    sys.settrace(tracer)
    escaped("settrace")
except Exception:
    pass
def solve(x):
    return x
