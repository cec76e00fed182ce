"""Huge recursion limit and a destructor chain that recurses through C at interpreter shutdown."""
# tags: escape
import sys
sys.setrecursionlimit(10**7)
class Node:
    def __init__(self, nxt=None):
        self.nxt = nxt
    def __del__(self):
        repr(self.nxt)
head = None
for _ in range(10**6):
    head = Node(head)
def solve(x):
    return x
