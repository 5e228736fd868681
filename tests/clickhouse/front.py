"""A thin HTTP front for ClickHouse's own engine (chdb), standing in for a server's HTTP
port in sockacct's tests: it hands each request's `query` parameter and its decoded body
to the engine unchanged. Everything else (DDL, parsing, types, deduplication) is the
engine's.

    front.py DATA_DIR [--lose-reply N]

Prints "port P" when it listens on 127.0.0.1:P. With --lose-reply N, the connection of
the N-th INSERT is closed after the engine ran it, without a reply (a lost reply).
Requests: POST /?query=Q with a body (zstd when Content-Encoding says so): runs Q, the
body appended on a new line. POST / with the query as the body, or GET /?query=Q: runs Q
and returns its result as TabSeparated.
"""
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from chdb import session

DATA = sys.argv[1]
LOSE = int(sys.argv[sys.argv.index("--lose-reply") + 1]) if "--lose-reply" in sys.argv else 0
SESSION = session.Session(DATA)
LOCK = threading.Lock()
INSERTS = [0]


class Front(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def reply(self, code, text):
        data = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/tab-separated-values; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def run(self, query, body):
        sql = query if not body else query + "\n" + body
        with LOCK:
            try:
                res = SESSION.query(sql, "TabSeparated")
            except Exception as e:  # the engine's own error, as a server would send it
                return 500, str(e) + "\n", False
            insert = query.lstrip().upper().startswith("INSERT")
            if insert:
                INSERTS[0] += 1
            lose = insert and INSERTS[0] == LOSE
        return 200, str(res), lose

    def do_GET(self):
        q = parse_qs(urlparse(self.path).query).get("query", [""])[0]
        code, text, _ = self.run(q, "")
        self.reply(code, text)

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(n)
        if self.headers.get("Content-Encoding", "").lower() == "zstd":
            raw = subprocess.run(["zstd", "-dc"], input=raw, capture_output=True, check=True).stdout
        body = raw.decode()
        q = parse_qs(urlparse(self.path).query).get("query", [""])[0]
        if not q:
            q, body = body, ""
        code, text, lose = self.run(q, body)
        if lose:
            # The engine stored it; the client never hears so.
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.reply(code, text)


# One thread per connection: clients keep theirs open between requests.
server = ThreadingHTTPServer(("127.0.0.1", 0), Front)
print(f"port {server.server_address[1]}", flush=True)
server.serve_forever()
