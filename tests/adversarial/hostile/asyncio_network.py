"""Connect through asyncio's event loop (its own socket paths: open_connection, datagram endpoints)."""
# tags: escape
import asyncio
async def main():
    for what, coro in (("tcp", asyncio.open_connection("127.0.0.1", PORT)),):
        try:
            await asyncio.wait_for(coro, 1)
            escaped("asyncio " + what)
        except Exception:
            pass
    try:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=("127.0.0.1", UDP_PORT))
        escaped("asyncio udp")
    except Exception:
        pass
try:
    asyncio.run(main())
except Exception:
    pass
def solve(x):
    return x
