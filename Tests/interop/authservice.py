"""A small HTTP auth service for the http_auth.lua tests: asyncio, one process, keep-alive.

    python3 authservice.py PORTFILE DELAY_SECONDS [any]

POST with JSON {"username", "password", ...}: 200 if password == "secret" (or with `any`,
always), else 401. The 200 answer's body is the client's ACL, {"publish": ["dev/%c/#"],
"subscribe": ["dev/%c/#", "cmd/%u/#"]}, except for user name "free" and with `any` (empty: no
restriction), "typo" ({"publsh": ["#"], "subscribe": ["#"]}) and "array" ([]).
Every answer comes after DELAY_SECONDS. Writes the port it bound to PORTFILE.
"""
import asyncio
import json
import sys


async def handle(reader, writer, delay, accept_all):
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            method, path, _ = line.decode().split(" ", 2)
            length = 0
            while True:
                header = await reader.readline()
                if header in (b"\r\n", b""):
                    break
                name, value = header.decode().split(":", 1)
                if name.strip().lower() == "content-length":
                    length = int(value)
            body = json.loads(await reader.readexactly(length)) if length else {}
            await asyncio.sleep(delay)
            out = b""
            ok = method == "POST" and (accept_all or body.get("password") == "secret")
            status = "200 OK" if ok else "401 Unauthorized"
            if ok and not accept_all and body.get("username") == "typo":
                out = json.dumps({"publsh": ["#"], "subscribe": ["#"]}).encode()
            elif ok and not accept_all and body.get("username") == "array":
                out = b"[]"
            elif ok and not accept_all and body.get("username") != "free":
                out = json.dumps({"publish": ["dev/%c/#"], "subscribe": ["dev/%c/#", "cmd/%u/#"]}).encode()
            writer.write(f"HTTP/1.1 {status}\r\ncontent-length: {len(out)}\r\n\r\n".encode() + out)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        pass
    writer.close()


async def main(portfile, delay, accept_all):
    server = await asyncio.start_server(lambda r, w: handle(r, w, delay, accept_all), "127.0.0.1", 0, backlog=4096)
    with open(portfile, "w") as f:
        f.write(str(server.sockets[0].getsockname()[1]))
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2]), sys.argv[3:] == ["any"]))
