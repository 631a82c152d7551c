"""A stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1, for push tests
and for dataset downloads (`datasets`: what `hf://datasets/...` names fetch).

It answers the handful of endpoints that huggingface_hub's `create_repo`,
`create_branch`, `list_repo_files` and `create_commit` call, and records
every request so that tests can check what the real client sent: the
headers, the created repo, each committed file's path and bytes, and each
deletion. It keeps each revision's files, so a second push sees what the
first left. `fail_with` makes repo creation answer an error status; `silent`
makes every request wait without an answer (a Hub that never replies).
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self):
        self.requests: list[dict] = []
        self.commits: list[dict] = []
        self.created: list[dict] = []
        self.fail_with: int | None = None
        self.silent = threading.Event()
        self.released = threading.Event()  # set on exit, so silent handlers end
        self.trees: dict[tuple[str, str], dict[str, bytes]] = {}  # (repo, revision) -> files
        # Dataset repositories for downloads: (repo, revision) -> (commit, {path: bytes}).
        self.datasets: dict[tuple[str, str], tuple[str, dict[str, bytes]]] = {}
        # Headers a hostile Hub puts on its file answers instead of the true ones.
        self.hostile_headers: dict[str, str] = {}
        # File answers as a refusing Hub (an HTTP status) or a captive portal (a web page) gives them.
        self.file_status: int | None = None
        self.portal = False
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        # A short poll interval: shutdown() waits for the loop to notice it.
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.released.set()
        self.server.shutdown()
        self.server.server_close()

    def committed_files(self) -> dict[str, bytes]:
        files = {}
        for commit in self.commits:
            files.update(commit["files"])
        return files

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _reply(self, status: int, payload) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if status >= 400:
                    self.send_header("X-Error-Message", payload.get("error", "error"))
                self.end_headers()
                self.wfile.write(body)

            def _hold_if_silent(self) -> bool:
                if hub.silent.is_set():
                    hub.released.wait(timeout=60)
                    return True
                return False

            def _dataset_file(self, method: str) -> bool:
                """HEAD and GET of /datasets/OWNER/NAME/resolve/REVISION/PATH, as
                hf_hub_download asks: the commit and an ETag in the headers."""
                from urllib.parse import unquote

                match = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path.split("?")[0])
                if not match:
                    return False
                repo, revision, path = match.group(1), unquote(match.group(2)), unquote(match.group(3))
                if hub.portal:
                    page = b"<html><body>Please log in to the guest network</body></html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    if method == "GET":
                        self.wfile.write(page)
                    return True
                if hub.file_status:
                    self.send_response(hub.file_status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return True
                found = hub.datasets.get((repo, revision))
                if found is None:
                    # A commit hash asks for whatever revision resolved to it.
                    found = next((v for v in hub.datasets.values() if v[0] == revision), None)
                if found is None or path not in found[1]:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "RepoNotFound" if found is None else "EntryNotFound")
                    self.send_header("X-Error-Message", "not found")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return True
                commit, files = found
                import hashlib

                body = files[path]
                self.send_response(200)
                headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha1(body).hexdigest()}"',
                           "Content-Length": str(len(body)), **hub.hostile_headers}
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                if method == "GET":
                    self.wfile.write(body)
                return True

            def do_HEAD(self):
                hub.requests.append({"method": "HEAD", "path": self.path,
                                     "headers": {k.lower(): v for k, v in self.headers.items()}, "body": b""})
                if self._hold_if_silent():
                    return
                if not self._dataset_file("HEAD"):
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            def do_GET(self):
                hub.requests.append({"method": "GET", "path": self.path,
                                     "headers": {k.lower(): v for k, v in self.headers.items()}, "body": b""})
                if self._hold_if_silent():
                    return
                if self._dataset_file("GET"):
                    return
                from urllib.parse import unquote

                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/?]+)", self.path.split("?")[0])
                if not match:
                    return self._reply(404, {"error": f"unknown endpoint {self.path}"})
                repo, revision = match.group(1), unquote(match.group(2))
                files = hub.trees.get((repo, revision), {".gitattributes": b"*.safetensors filter=lfs\n"})
                return self._reply(200, [{"type": "file", "path": name, "size": len(data), "oid": "0" * 40}
                                         for name, data in sorted(files.items())])

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                hub.requests.append({"method": "POST", "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                     "body": body})
                if self._hold_if_silent():
                    return
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    if hub.fail_with:
                        return self._reply(hub.fail_with, {"error": f"failure {hub.fail_with}"})
                    data = json.loads(body)
                    hub.created.append(data)
                    name = f"{data.get('organization')}/{data['name']}" if data.get("organization") else data["name"]
                    return self._reply(200, {"url": f"{hub.endpoint}/{name}"})
                if path == "/api/validate-yaml":
                    return self._reply(200, {"errors": [], "warnings": []})
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)", path)
                if not match:
                    return self._reply(404, {"error": f"unknown endpoint {path}"})
                repo, action, revision = match.groups()
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
                if action == "branch":
                    return self._reply(200, {})
                from urllib.parse import unquote

                revision = unquote(revision)
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                files = {item["value"]["path"]: base64.b64decode(item["value"]["content"])
                         for item in lines if item["key"] == "file"}
                deleted = [item["value"]["path"] for item in lines if item["key"] == "deletedFile"]
                header = next(item["value"] for item in lines if item["key"] == "header")
                create_pr = "create_pr=1" in self.path
                hub.commits.append({"repo": repo, "revision": revision, "header": header, "files": files,
                                    "deleted": deleted, "create_pr": create_pr})
                if not create_pr:
                    tree = hub.trees.setdefault((repo, revision), {".gitattributes": b"*.safetensors filter=lfs\n"})
                    for name in deleted:
                        tree.pop(name, None)
                    tree.update(files)
                return self._reply(200, {
                    "commitUrl": f"{hub.endpoint}/{repo}/commit/{'c' * 40}", "commitOid": "c" * 40,
                    "pullRequestUrl": f"{hub.endpoint}/{repo}/discussions/1" if create_pr else None,
                })

        return Handler
