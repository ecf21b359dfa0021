"""Stand-ins for the Hugging Face hub, for tests without a network: a cache laid out as
huggingface_hub lays it out, and an HTTP server on 127.0.0.1 answering as the hub does
(for HF_ENDPOINT), with revisions and the hub's error headers."""

import hashlib
import http.server
import json
import math
import os
import threading

import numpy as np
import safetensors.numpy

# A timm config.json's pretrained_cfg, at the narrow test nets' 64-pixel crop; crop_pct
# 0.8 (not torchvision's 0.875) shows whether it is read: Q = 64 / 0.8 = 80.
TIMM_CONFIG = {
    "architecture": "vgg11",
    "num_classes": 1000,
    "pretrained_cfg": {"tag": "tv_in1k", "input_size": [3, 64, 64], "crop_pct": 0.8,
                       "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]},
}


def timm_layout(sd):
    """torchvision keys -> timm's VGG keys, written out here as timm's own filter does."""
    out = {}
    for key, value in sd.items():
        if key.startswith("classifier.0."):
            key = key.replace("classifier.0", "pre_logits.fc1")
            if key.endswith("weight"):
                channels = sd["features.0.weight"].shape[0] * 8  # the last conv's width
                window = math.isqrt(value.shape[1] // channels)
                value = value.reshape(value.shape[0], channels, window, window)
        elif key.startswith("classifier.3."):
            key = key.replace("classifier.3", "pre_logits.fc2")
            if key.endswith("weight"):
                value = value.reshape(*value.shape, 1, 1)
        elif key.startswith("classifier.6."):
            key = key.replace("classifier.6", "head.fc")
        out[key] = np.ascontiguousarray(value)
    return out


def repo_files(state_dict, config=TIMM_CONFIG):
    """{filename: bytes} of a timm model repo holding `state_dict` (timm's keys)."""
    return {"model.safetensors": safetensors.numpy.save(state_dict),
            "config.json": json.dumps(config).encode()}


def commit_hash(files):
    digest = hashlib.sha1()
    for name in sorted(files):
        digest.update(name.encode() + files[name])
    return digest.hexdigest()


def write_cache(hf_home, repo_id, files, revision="main"):
    """Lays `files` out in huggingface_hub's cache under HF_HOME; returns the commit."""
    commit = commit_hash(files)
    repo = os.path.join(hf_home, "hub", "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", revision), "w") as f:
        f.write(commit)
    snapshot = os.path.join(repo, "snapshots", commit)
    os.makedirs(snapshot, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(snapshot, name), "wb") as f:
            f.write(data)
    return commit


class HubServer:
    """The hub's file endpoint, /{org}/{name}/resolve/{revision}/{file}, on 127.0.0.1.

    `repos` maps a repo id to {revision: {filename: bytes}}; a revision is a branch or
    tag name, and each also answers to its commit hash. Requests are counted per path.
    """

    def __init__(self, repos):
        self.repos, self.requests = repos, []
        self.commits = {repo: {commit_hash(files): files for files in revisions.values()}
                        for repo, revisions in repos.items()}
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def _lookup(self, path):
        parts = path.split("?")[0].strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return 404, {"X-Error-Code": "RepoNotFound"}, None
        repo, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        if repo not in self.repos:
            return 404, {"X-Error-Code": "RepoNotFound"}, None
        files = self.repos[repo].get(revision) or self.commits[repo].get(revision)
        if files is None:
            return 404, {"X-Error-Code": "RevisionNotFound"}, None
        commit = commit_hash(files)
        if filename not in files:
            return 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}, None
        data = files[filename]
        return 200, {"X-Repo-Commit": commit, "Content-Length": str(len(data)),
                     "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}, data

    def _handler(self):
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, with_body):
                stand_in.requests.append((self.command, self.path))
                status, headers, data = stand_in._lookup(self.path)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if data is None:
                    self.send_header("Content-Length", "0")
                self.end_headers()
                if with_body and data is not None:
                    self.wfile.write(data)

            def do_HEAD(self):
                self._answer(False)

            def do_GET(self):
                self._answer(True)

            def log_message(self, *args):
                pass

        return Handler
