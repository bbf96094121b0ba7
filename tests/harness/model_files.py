"""Serves the embedding model's two files (from the installed wordllama wheel) over HTTP on
127.0.0.1, as a model store would, for chains that fetch them through an Envoy cluster."""
import tempfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from harness import wordllama_files


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class ModelFileServer:
    """GET /<file name> for the weights and the tokenizer."""

    def __init__(self):
        self.directory = Path(tempfile.mkdtemp(prefix="models-"))
        for path in wordllama_files():
            (self.directory / path.name).symlink_to(path)
        handler = partial(_Quiet, directory=str(self.directory))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
