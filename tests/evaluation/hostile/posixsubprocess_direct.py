"""call _posixsubprocess.fork_exec directly (no subprocess.Popen audit event)."""
# tags: escape
import _posixsubprocess, os
_posixsubprocess.fork_exec(["/bin/sleep", "10000", TOKEN], [b"/bin/sleep"], True, (), None, None,
                           -1, -1, -1, -1, -1, -1, *os.pipe(), False, False, -1, None, None, None, -1, None, False)
escaped("fork_exec")
