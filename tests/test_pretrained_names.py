"""Pretrained GPT-2 by name: a local path, the seed's models_dir, the Hugging Face cache, and a download only
when asked -- against a fake cache folder and a loopback server that answers as the hub does (no network)."""

import hashlib
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from fastgpt import GPTModel, from_pretrained
from fastgpt.checkpoints import names
from helpers import TINY

pytestmark = pytest.mark.usefixtures("single_thread")

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny GPT-2 folder as fastgpt saves it, and the model."""
    folder = tmp_path_factory.mktemp("tiny") / "hf"
    torch.manual_seed(0)
    model = GPTModel(TINY).eval()
    model.save_pretrained(folder)
    return folder, model


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """An empty working directory, an empty hub cache, no endpoint: nothing to find yet."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: any network use fails fast
    return tmp_path


def fake_cache(cache: Path, repo_id: str, source: Path) -> Path:
    """The hub cache's layout for ``repo_id``: snapshots/<revision>/ with the files, refs/main naming it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        shutil.copy(file, snapshot / file.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


def test_offline_a_name_found_nowhere_says_where_it_looked_and_how_to_download(elsewhere):
    with pytest.raises(FileNotFoundError) as info:
        from_pretrained("gpt2-medium")
    message = str(info.value)
    for piece in ["GPT-2 'gpt2-medium' (355M) was not found offline", str(elsewhere / "work" / "gpt2" / "355M"),
                  "the seed's models_dir", f"the Hugging Face cache {elsewhere / 'hub'}",
                  "from_pretrained('gpt2-medium', download=True)", "--checkpoint gpt2-medium --download"]:
        assert piece in message, message
    with pytest.raises(FileNotFoundError, match="checkpoint gpt3 does not exist"):
        from_pretrained("gpt3")  # not a name: a path, as before


@pytest.mark.parametrize("name", ["gpt2", "124M"])
@pytest.mark.parametrize("repo_id", ["gpt2", "openai-community/gpt2"])
def test_a_name_is_found_in_the_hugging_face_cache(elsewhere, tiny_folder, name, repo_id):
    folder, model = tiny_folder
    snapshot = fake_cache(elsewhere / "hub", repo_id, folder)
    assert names.resolve_checkpoint(name) == snapshot
    assert same_weights(from_pretrained(name), model)


def test_a_cached_repo_without_weights_is_not_found(elsewhere, tiny_folder):
    snapshot = fake_cache(elsewhere / "hub", "gpt2", tiny_folder[0])
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="was not found offline"):
        from_pretrained("gpt2")


def seed_models_dir(root: Path, tiny_tf: Path) -> Path:
    """The seed's layout: <models_dir>/124M/ with OpenAI's files."""
    shutil.copytree(tiny_tf, root / "124M")
    return root


@pytest.fixture(scope="module")
def tiny_tf(tmp_path_factory, tiny_folder):
    """A stand-in for one of the seed's size folders: hparams.json marks it as one (OpenAI's files are
    tested in test_checkpoints.py; here any loadable folder will do, and config.json is read first)."""
    folder = tmp_path_factory.mktemp("seed") / "size"
    shutil.copytree(tiny_folder[0], folder)
    (folder / "hparams.json").write_text("{}")
    return folder


def test_the_seeds_models_dir_comes_before_the_cache_and_a_path_before_both(elsewhere, tiny_folder, tiny_tf):
    folder, model = tiny_folder
    fake_cache(elsewhere / "hub", "gpt2", folder)
    seed_dir = seed_models_dir(elsewhere / "work" / "gpt2", tiny_tf)  # the seed's default: ./gpt2
    # ./gpt2 is a models_dir, not a checkpoint
    assert names.resolve_checkpoint("gpt2").resolve() == seed_dir / "124M"
    assert names.resolve_checkpoint("124M").resolve() == seed_dir / "124M"
    assert names.resolve_checkpoint("124M", models_dir=elsewhere / "nowhere").parent.name == "snapshots"  # the cache
    other = seed_models_dir(elsewhere / "models", tiny_tf)
    assert names.resolve_checkpoint("gpt2", models_dir=other) == other / "124M"
    assert same_weights(from_pretrained("124M", models_dir=other), model)
    with pytest.raises(FileNotFoundError, match=r"is the seed's models_dir \(a folder of size subfolders: 124M\), "
                                                r"not a checkpoint: pass .*124M"):
        from_pretrained(other)
    shutil.rmtree(seed_dir)
    shutil.copytree(folder, elsewhere / "work" / "gpt2")  # now ./gpt2 is a checkpoint folder: the path wins
    assert names.resolve_checkpoint("gpt2") == Path("gpt2")


def test_without_huggingface_hub_the_error_names_the_extra(elsewhere, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_hub(name, *args, **kwargs):
        if name.split(".")[0] == "huggingface_hub":
            raise ImportError("No module named 'huggingface_hub'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_hub)
    with pytest.raises(FileNotFoundError, match=r"huggingface_hub is not installed \(pip install 'fastgpt\[hub\]'"):
        from_pretrained("gpt2")
    with pytest.raises(ModuleNotFoundError, match=r"downloading gpt2 needs huggingface_hub: pip install "
                                                  r"'fastgpt\[hub\]'"):
        from_pretrained("gpt2", download=True)


# ---------------------------------------------------------------- a loopback hub

class Hub:
    """A loopback HTTP server answering as the Hugging Face hub does for one tiny model repository.

    127.0.0.1 only, on a free port, in a daemon thread; it stops when the test ends, and by itself after
    ``lifetime`` seconds or ``max_requests`` requests whatever happens."""

    def __init__(self, files: dict, repo_id="gpt2", lifetime=120, max_requests=200):
        self.files, self.repo_id, self.requests, self.announced_extra = files, repo_id, [], 0
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def answer(self, body):
                hub.requests.append((self.command, self.path))
                if len(hub.requests) > max_requests:
                    threading.Thread(target=hub.server.shutdown, daemon=True).start()
                path = self.path.split("?")[0]
                api = f"/api/models/{hub.repo_id}/revision/"
                resolve = f"/{hub.repo_id}/resolve/"
                if path.startswith(api):
                    siblings = [{"rfilename": name} for name in [*hub.files, "pytorch_model.bin", "tf_model.h5"]]
                    self.send(json.dumps({"id": hub.repo_id, "modelId": hub.repo_id, "sha": REVISION,
                                          "siblings": siblings, "private": False}).encode(),
                              {"Content-Type": "application/json"}, body)
                elif path.startswith(f"/api/models/{hub.repo_id}/tree/"):
                    tree = []
                    for name, data in {**hub.files, "pytorch_model.bin": b"x", "tf_model.h5": b"x"}.items():
                        entry = {"type": "file", "path": name, "size": len(data),
                                 "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
                        if name.endswith((".safetensors", ".bin", ".h5")):
                            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                                            "pointerSize": 134}
                        tree.append(entry)
                    self.send(json.dumps(tree).encode(), {"Content-Type": "application/json"}, body)
                elif path.startswith(resolve) and path.split("/", 4)[-1] in hub.files:
                    name = path.split("/", 4)[-1]
                    data = hub.files[name]
                    sha = hashlib.sha256(data).hexdigest()
                    headers = {"X-Repo-Commit": REVISION, "ETag": f'"{sha}"', "Content-Type":
                               "application/octet-stream"}
                    if name.endswith(".safetensors"):  # an LFS file: its etag is its sha256
                        headers.update({"X-Linked-Etag": f'"{sha}"',
                                        "X-Linked-Size": str(len(data) + hub.announced_extra)})
                    self.send(data, headers, body)
                else:
                    self.send(b'{"error": "Entry not found"}', {"X-Error-Code": "EntryNotFound",
                                                                "Content-Type": "application/json"}, body, 404)

            def send(self, data, headers, body, status=200):
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(key, value)
                self.end_headers()
                if body:
                    self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.timer = threading.Timer(lifetime, self.server.shutdown)
        self.timer.daemon = True

    def __enter__(self):
        self.thread.start()
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()


def test_a_download_happens_only_when_asked_through_huggingface_hub(elsewhere, tiny_folder, monkeypatch):
    pytest.importorskip("huggingface_hub")
    folder, model = tiny_folder
    files = {name: (folder / name).read_bytes() for name in names.HUB_FILES}
    with Hub(files) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        with pytest.raises(FileNotFoundError, match="was not found offline"):
            from_pretrained("gpt2")
        assert hub.requests == []  # offline means offline
        downloaded = from_pretrained("gpt2", download=True)
        assert same_weights(downloaded, model)
        fetched = {path.split("/")[-1] for command, path in hub.requests if command == "GET" and "/resolve/" in path}
        assert fetched == set(names.HUB_FILES)  # config and safetensors only, not the other formats
    # Now in the cache: found offline, with no server at all.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert names.resolve_checkpoint("gpt2").parent == elsewhere / "hub" / "models--gpt2" / "snapshots"
    assert same_weights(from_pretrained("gpt2"), model)


def test_a_download_cut_short_is_refused_by_huggingface_hubs_check(elsewhere, tiny_folder, monkeypatch):
    """The hub announces each file's size (and an LFS file's sha256); huggingface_hub checks what arrives."""
    pytest.importorskip("huggingface_hub")
    folder, _ = tiny_folder
    files = {name: (folder / name).read_bytes() for name in names.HUB_FILES}
    with Hub(files) as hub:
        hub.announced_extra = 100  # the announced size of model.safetensors exceeds what is sent
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        with pytest.raises(OSError, match="Consistency check failed"):
            from_pretrained("gpt2", download=True)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(FileNotFoundError, match="was not found offline"):
        from_pretrained("gpt2")  # nothing half-downloaded passes for the model


def test_the_command_line_takes_names_and_downloads_only_with_download(elsewhere, tiny_folder, monkeypatch, capsys):
    pytest.importorskip("huggingface_hub")
    from fastgpt import cli

    assert set(cli._PRETRAINED_NAMES) == set(names.HUB_NAMES) | set(names.SEED_SIZES)
    folder, _ = tiny_folder
    files = {name: (folder / name).read_bytes() for name in names.HUB_FILES}
    with Hub(files) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        with pytest.raises(SystemExit):
            cli.main(["generate", "x", "--checkpoint", "gpt2", "--max-new-tokens", "2"])
        assert "was not found offline" in capsys.readouterr().err and hub.requests == []
        assert cli.main(["generate", "x", "--checkpoint", "gpt2", "--download", "--max-new-tokens", "2"]) == 0
        assert "2 new tokens" in capsys.readouterr().err
    assert cli.main(["generate", "x", "--checkpoint", "124M", "--max-new-tokens", "2"]) == 0  # now cached
    with pytest.raises(SystemExit):
        cli.main(["generate", "x", "--download"])
    assert "--download applies to a --checkpoint given by name" in capsys.readouterr().err
