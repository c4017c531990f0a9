#!/usr/bin/env python3
"""A loopback HTTP(S) file server for vdisk's remote-source tests and benchmarks (stdlib only).

It serves the files under --root with single byte ranges, ETag, Last-Modified, If-Match and
If-Unmodified-Since, and injects faults on request. Usage:

    server.py --root DIR [--port 0] [--bind 127.0.0.1] [--tls-cert C --tls-key K]
              [--latency-ms N] [--rate BYTES_PER_S] [--require-header 'Name: value']
              [--no-range] [--no-head] [--exit-on-stdin-eof]

The first line on stdout is the port it listens on (useful with --port 0).

Paths:
  /<path>                              the file <path> under the root
  /p/<token>/n/<ns>/b/<bucket>/o/<obj> OCI pre-authenticated form: the file <obj> (URL-decoded,
                                       so %2F is a directory separator)
  /_fault/<spec>/<path>                <path> with faults; <spec> is a comma-separated list:
      status=N         answer N (with an empty body) instead of the file
      retry-after=S    send Retry-After: S with that status
      drop             send half the body, then reset the connection
      truncate         send half the body, then close the connection cleanly
      slow=S           wait S seconds (default 2) before answering
      badrange         answer 206 with another range (shifted by 512 bytes, or shorter)
      ignore-range     answer 200 with the whole file (a server that ignores Range)
      redirect         answer 302 to the same path without the fault prefix
      encoding=NAME    label the reply Content-Encoding: NAME (the body is unchanged)
      replace-after=N  from the N+1th request on, serve another object: a new ETag and
                       Last-Modified and different bytes (If-Match with the old ETag gets 412)
      after=N          let the first N requests through untouched (the fault starts after)
      times=N          apply the fault to N requests only (default: every request)
    Counters are kept per spec and path, so each distinct URL is its own scenario.
  /_stats                              JSON: requests, bytes sent, counts by method, status, path
  /_stats/reset                        zero the counters (answers the old ones)
The query string is ignored (presigned URLs carry their signature there).
"""

import argparse
import email.utils
import http.server
import json
import os
import socket
import ssl
import struct
import sys
import threading
import time
import urllib.parse

STATS_LOCK = threading.Lock()
STATS = {"requests": 0, "bytes": 0, "methods": {}, "status": {}, "paths": {}}
FAULT_COUNTS = {}


def count(key, table, value=1):
    table[key] = table.get(key, 0) + value


def parse_spec(spec):
    out = {}
    for item in spec.split(","):
        if not item:
            continue
        if "=" in item:
            k, v = item.split("=", 1)
            out[k.strip()] = v.strip()
        else:
            out[item.strip()] = ""
    return out


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "vdisk-test-server/1"

    def log_message(self, fmt, *args):  # quiet: the tests read /_stats instead
        pass

    # --- plumbing -----------------------------------------------------------------------
    def send_plain(self, status, body=b"", headers=None):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.write_body(body)

    def write_body(self, data):
        rate = self.server.opts.rate
        view = memoryview(data)
        chunk = 64 << 10
        start = time.monotonic()
        sent = 0
        while sent < len(view):
            n = min(chunk, len(view) - sent)
            self.wfile.write(view[sent:sent + n])
            sent += n
            if rate:
                ahead = sent / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
        with STATS_LOCK:
            STATS["bytes"] += sent

    def record(self, status, path):
        with STATS_LOCK:
            count(str(status), STATS["status"])
            count(path, STATS["paths"])

    # --- requests -----------------------------------------------------------------------
    def do_HEAD(self):
        self.handle_request()

    def do_GET(self):
        self.handle_request()

    def handle_request(self):
        opts = self.server.opts
        raw_path = urllib.parse.urlsplit(self.path).path
        if raw_path in ("/_stats", "/_stats/reset"):
            # Not counted, not delayed.
            with STATS_LOCK:
                body = json.dumps(STATS).encode()
                if raw_path == "/_stats/reset":
                    STATS.update({"requests": 0, "bytes": 0, "methods": {}, "status": {}, "paths": {}})
            return self.send_plain(200, body, {"Content-Type": "application/json"})
        with STATS_LOCK:
            STATS["requests"] += 1
            count(self.command, STATS["methods"])
        if opts.latency_ms:
            time.sleep(opts.latency_ms / 1000.0)
        for name, value in opts.require_header:
            if self.headers.get(name) != value:
                self.record(401, raw_path)
                return self.send_plain(401, b"missing or wrong header\n")
        if self.command == "HEAD" and opts.no_head:
            self.record(403, raw_path)
            return self.send_plain(403)

        faults = {}
        fault_key = None
        path = raw_path
        if path.startswith("/_fault/"):
            rest = path[len("/_fault/"):]
            spec, _, path = rest.partition("/")
            path = "/" + path
            faults = parse_spec(urllib.parse.unquote(spec))
            fault_key = (spec, path)
        # The request number for this scenario (1-based), and whether the fault applies to it.
        active = False
        replaced = False
        if fault_key is not None:
            with STATS_LOCK:
                n = FAULT_COUNTS.get(fault_key, 0) + 1
                FAULT_COUNTS[fault_key] = n
            after = int(faults.get("after", "0") or 0)
            times = faults.get("times")
            active = n > after and (times is None or n <= after + int(times))
            if "replace-after" in faults:
                replaced = n > int(faults["replace-after"])

        file_path = self.map_path(path)
        if file_path is None or not os.path.isfile(file_path):
            self.record(404, raw_path)
            return self.send_plain(404, b"not found\n")

        if active and "slow" in faults:
            time.sleep(float(faults["slow"] or 2))
        if active and "redirect" in faults:
            query = urllib.parse.urlsplit(self.path).query
            location = path + ("?" + query if query else "")
            self.record(302, raw_path)
            return self.send_plain(302, b"", {"Location": location})
        if active and "status" in faults:
            status = int(faults["status"])
            headers = {}
            if "retry-after" in faults:
                headers["Retry-After"] = faults["retry-after"]
            self.record(status, raw_path)
            return self.send_plain(status, b"", headers)

        st = os.stat(file_path)
        size = st.st_size
        etag = '"%x-%x"' % (size, st.st_mtime_ns)
        mtime = st.st_mtime
        if replaced:
            etag = '"%x-%x-replaced"' % (size, st.st_mtime_ns)
            mtime += 3600
        last_modified = email.utils.formatdate(mtime, usegmt=True)
        common = {"ETag": etag, "Last-Modified": last_modified, "Accept-Ranges": "bytes"}

        if_match = self.headers.get("If-Match")
        if if_match is not None and if_match.strip() != "*" and etag not in [t.strip() for t in if_match.split(",")]:
            self.record(412, raw_path)
            return self.send_plain(412, b"", common)
        ius = self.headers.get("If-Unmodified-Since")
        if ius is not None:
            try:
                limit = email.utils.parsedate_to_datetime(ius).timestamp()
                if int(mtime) > limit:
                    self.record(412, raw_path)
                    return self.send_plain(412, b"", common)
            except (TypeError, ValueError):
                pass

        rng = self.headers.get("Range")
        ignore = opts.no_range or (active and "ignore-range" in faults)
        if rng is None or ignore or self.command == "HEAD":
            self.record(200, raw_path)
            return self.send_file(200, file_path, 0, size, size, common, faults if active else {}, replaced)
        parsed = self.parse_range(rng, size)
        if parsed is None:
            self.record(416, raw_path)
            return self.send_plain(416, b"", dict(common, **{"Content-Range": "bytes */%d" % size}))
        first, last = parsed
        if active and "badrange" in faults:
            # Never the range asked for: shifted, or else shortened.
            if first + 512 < size:
                first, last = first + 512, min(last + 512, size - 1)
            elif first > 0:
                first, last = first - 1, last - 1
            elif last > first:
                last -= 1
        self.record(206, raw_path)
        headers = dict(common, **{"Content-Range": "bytes %d-%d/%d" % (first, last, size)})
        if active and "encoding" in faults:
            headers["Content-Encoding"] = faults["encoding"] or "gzip"
        return self.send_file(206, file_path, first, last + 1 - first, size, headers, faults if active else {}, replaced)

    def parse_range(self, value, size):
        value = value.strip()
        if not value.startswith("bytes=") or "," in value:
            return None
        a, _, b = value[len("bytes="):].partition("-")
        try:
            if a == "":
                n = int(b)
                if n == 0:
                    return None
                return max(0, size - n), size - 1
            first = int(a)
            last = int(b) if b else size - 1
        except ValueError:
            return None
        if first >= size or last < first:
            return None
        return first, min(last, size - 1)

    def send_file(self, status, file_path, offset, length, size, headers, faults, replaced):
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command == "HEAD":
            return
        with open(file_path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        if replaced:
            data = bytes(b ^ 0x5A for b in data)
        if "drop" in faults or "truncate" in faults:
            self.write_body(data[: len(data) // 2])
            self.wfile.flush()
            if "drop" in faults:
                # Reset: SO_LINGER with a zero timeout makes close() send RST.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        self.write_body(data)

    def map_path(self, path):
        parts = path.split("/")
        # /p/<token>/n/<ns>/b/<bucket>/o/<object>
        if len(parts) >= 9 and parts[1] == "p" and parts[3] == "n" and parts[5] == "b" and parts[7] == "o":
            rel = urllib.parse.unquote("/".join(parts[8:]))
        else:
            rel = urllib.parse.unquote(path.lstrip("/"))
        root = os.path.realpath(self.server.opts.root)
        full = os.path.realpath(os.path.join(root, rel))
        if full != root and not full.startswith(root + os.sep):
            return None
        return full


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--bind", default="127.0.0.1")
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    ap.add_argument("--latency-ms", type=float, default=0)
    ap.add_argument("--rate", type=float, default=0, help="bytes per second per response (0: unlimited)")
    ap.add_argument("--require-header", action="append", default=[])
    ap.add_argument("--no-range", action="store_true")
    ap.add_argument("--no-head", action="store_true")
    ap.add_argument("--exit-on-stdin-eof", action="store_true", help="stop when stdin closes (tests)")
    opts = ap.parse_args()
    pairs = []
    for h in opts.require_header:
        name, _, value = h.partition(":")
        pairs.append((name.strip(), value.strip()))
    opts.require_header = pairs

    server = Server((opts.bind, opts.port), Handler)
    server.opts = opts
    if opts.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(opts.tls_cert, opts.tls_key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print(server.server_address[1], flush=True)
    # Stop when the parent closes our stdin (a test process that ends without killing us).
    def watch_stdin():
        try:
            sys.stdin.read()
        except Exception:
            pass
        os._exit(0)

    if opts.exit_on_stdin_eof:
        threading.Thread(target=watch_stdin, daemon=True).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
