"""N MQTT clients connect at once (raw sockets, asyncio), each with user name and password.

    python3 connectstorm.py PORT N PASSWORD

Prints one JSON line: {"seconds": time until every CONNACK came, "codes": {code: count}}.
"""
import asyncio
import json
import struct
import sys
import time


def connect_packet(client_id, username, password):
    def s(b):
        return struct.pack("!H", len(b)) + b
    body = s(b"MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 60) + s(client_id.encode()) + s(username.encode()) + s(password.encode())
    return bytes([0x10, len(body)]) + body


async def one(port, i, password):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(connect_packet(f"storm{i}", f"user{i}", password))
    await writer.drain()
    try:
        ack = await reader.readexactly(4)
        return ack[3], writer
    except asyncio.IncompleteReadError:
        return -1, writer


async def main(port, n, password):
    start = time.perf_counter()
    results = await asyncio.gather(*[one(port, i, password) for i in range(n)])
    seconds = time.perf_counter() - start
    codes = {}
    for code, _ in results:
        codes[str(code)] = codes.get(str(code), 0) + 1
    print(json.dumps({"seconds": seconds, "codes": codes}), flush=True)
    for _, writer in results:
        writer.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
