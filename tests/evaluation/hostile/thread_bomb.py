"""thousands of busy non-daemon threads."""
# tags: escape
import threading
def spin():
    while True:
        pass
for _ in range(5000):
    threading.Thread(target=spin).start()
