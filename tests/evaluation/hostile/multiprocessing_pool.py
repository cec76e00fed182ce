"""multiprocessing workers that never finish."""
# tags: escape
import multiprocessing, time
def forever(_):
    time.sleep(10_000)
if __name__ != "__nope__":
    pool = multiprocessing.Pool(8)
    pool.map_async(forever, range(8))
    escaped("multiprocessing pool")
def solve(x):
    return x
