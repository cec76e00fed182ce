"""memory bomb: keep allocating 100 MB blocks, touching every page."""
# tags: escape
blocks = []
while True:
    blocks.append(b"x" * 100_000_000)
