"""A private HTTP service for the relay's tests: HTTP/1.1 with keep-alive.

GET  /                 "hello from LABEL"
GET  /bytes/N          N bytes of a fixed pattern (Content-Length)
GET  /chunked/N        the same, chunked
GET  /headers          the request's headers, as JSON
GET  /slow/S           answers after S seconds
GET  /echo             with Upgrade: switches protocols, then echoes bytes until EOF
POST /sha256           the body's SHA-256 (hex) and length, as JSON

Usage: http_service.py ADDR PORT LABEL
"""

import hashlib
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PATTERN = bytes(range(256)) * 4096  # 1 MiB


def stream(write, n):
    while n > 0:
        piece = PATTERN[: min(n, len(PATTERN))]
        write(piece)
        n -= len(piece)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    label = ""

    def log_message(self, *args):
        pass

    def reply(self, body, status=200, kind="text/plain"):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        parts = self.path.split("/")
        if self.path == "/":
            self.reply(f"hello from {self.label}\n".encode())
        elif parts[1] == "bytes":
            n = int(parts[2])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            stream(self.wfile.write, n)
        elif parts[1] == "chunked":
            n = int(parts[2])
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

            def chunk(piece):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))

            stream(chunk, n)
            self.wfile.write(b"0\r\n\r\n")
        elif parts[1] == "headers":
            self.reply(json.dumps(dict(self.headers.items())).encode(), kind="application/json")
        elif parts[1] == "echo" and self.headers.get("Upgrade"):
            self.send_response(101)
            self.send_header("Connection", "Upgrade")
            self.send_header("Upgrade", self.headers["Upgrade"])
            self.end_headers()
            while True:
                data = self.rfile.read1(65536)
                if not data:
                    break
                self.wfile.write(data)
            self.close_connection = True
        elif parts[1] == "slow":
            time.sleep(float(parts[2]))
            self.reply(b"slow\n")
        else:
            self.reply(b"no such page\n", status=404)

    def do_POST(self):
        digest, total = hashlib.sha256(), 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                digest.update(self.rfile.read(size))
                total += size
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length", "0"))
            while left > 0:
                piece = self.rfile.read(min(left, 1 << 20))
                if not piece:
                    break
                digest.update(piece)
                total += len(piece)
                left -= len(piece)
        self.reply(json.dumps({"sha256": digest.hexdigest(), "length": total}).encode(), kind="application/json")


def main():
    addr, port, label = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    Handler.label = label
    server = ThreadingHTTPServer((addr, port), Handler)
    server.daemon_threads = True
    print("serving", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
