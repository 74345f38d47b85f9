"""A hostile web on loopback for the URL policy (tests/test_policy_opener.py).

- `Trap`: listens on 127.0.0.1:P and 127.0.0.2:P and counts every connection it accepts; a
  build that follows a hostile redirect reaches it (it answers any HTTP request with a JPEG,
  so a followed redirect would land an image in the shards).
- `HostileServer`: HTTP or HTTPS (a self-signed certificate made here) on 127.0.0.1, serving
  /img/N.jpg and redirects that try to leave the policy: see `REDIRECTS`.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .imageserver import make_image


class Trap:
    def __init__(self):
        for _ in range(20):
            first = socket.create_server(("127.0.0.2", 0))
            self.port = first.getsockname()[1]
            try:
                second = socket.create_server(("127.0.0.1", self.port))
                break
            except OSError:
                first.close()
        else:
            raise RuntimeError("no port free on both 127.0.0.1 and 127.0.0.2")
        self.sockets = [first, second]
        self.connections = 0
        self._lock = threading.Lock()
        self._stop = False

    def _serve(self, sock):
        while not self._stop:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            try:
                conn.settimeout(1)
                try:
                    conn.recv(65536)
                except OSError:
                    pass
                body = make_image(7)
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: "
                             + str(len(body)).encode() + b"\r\n\r\n" + body)
            except OSError:
                pass
            finally:
                conn.close()

    def __enter__(self):
        for sock in self.sockets:
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        for sock in self.sockets:
            sock.close()


def redirects(trap_port: int) -> dict[str, list[tuple[str, str]]]:
    """/redirect/<name>: the headers of a 302 that tries to get past the policy."""
    trap = f"127.0.0.2:{trap_port}"
    data = "data:image/jpeg;base64," + base64.b64encode(make_image(3)).decode()
    return {
        "ftp": [("Location", f"ftp://127.0.0.1:{trap_port}/a.jpg")],
        "file": [("Location", "file:///etc/hostname")],
        "data": [("Location", data)],
        "uri-only": [("URI", f"http://{trap}/a.jpg")],
        # urllib follows the first, a check reading the last sees an allowed host
        "two-locations": [("Location", f"http://{trap}/a.jpg"), ("Location", "/img/1.jpg")],
        "other-name": [("Location", f"http://localhost:{trap_port}/a.jpg")],
        "decimal": [("Location", f"http://2130706434:{trap_port}/a.jpg")],
        "hex": [("Location", f"http://0x7f000002:{trap_port}/a.jpg")],
        "octal": [("Location", f"http://0177.0.0.2:{trap_port}/a.jpg")],
        "ipv6-mapped": [("Location", f"http://[::ffff:127.0.0.2]:{trap_port}/a.jpg")],
    }


def self_signed(tmp_path) -> tuple[str, str]:
    """(certificate, key) files for 127.0.0.1, made with `cryptography`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "laionbuild test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


class HostileServer:
    def __init__(self, trap_port: int, tls: tuple[str, str] | None = None):
        table = redirects(trap_port)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):
                pass

            def do_GET(self):
                kind, _, name = self.path.strip("/").partition("/")
                if kind == "img":
                    body = make_image(int(name.split(".")[0]))
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif kind == "redirect" and name.split(".")[0] in table:
                    self.send_response(302)
                    for k, v in table[name.split(".")[0]]:
                        self.send_header(k, v)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self.send_error(404)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        scheme = "http"
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
