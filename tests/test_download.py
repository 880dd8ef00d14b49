"""`wingspan data download`, against a server on 127.0.0.1 that honours Range requests and
can cut a transfer or damage the bytes it sends."""

import hashlib
import http.server
import json
import threading
import zipfile

import pytest
from helpers import write_image

from wingspan.data import read_dataset
from wingspan.data.download import Source, download_dataset
from wingspan.errors import WingspanError


def _ethec_zip(path):
    """A small archive laid out as the ETHEC release: a top folder, split files, images."""
    records = {}
    with zipfile.ZipFile(path, "w") as z:
        for split in ("train", "val", "test"):
            recs = {}
            for i in range(4):
                token = f"{split}{i}"
                recs[token] = {"token": token, "image_path": "d", "image_name": f"{token}.jpg",
                               "family": "Pieridae", "subfamily": "Pierinae",
                               "genus": "Pieris", "specific_epithet": ["rapae", "napi"][i % 2],
                               "barcode": f"B-{token}"}
                image = write_image(path.parent / "img" / f"{token}.jpg", seed=len(records),
                                    fmt="JPEG")
                z.write(image, f"ETHEC_dataset/IMAGO_build_test_resized/d/{token}.jpg")
                records[token] = recs[token]
            z.writestr(f"ETHEC_dataset/splits/{split}.json", json.dumps(recs))
    return path


class Server:
    """Serves one file; `cut_after` bytes then a dropped connection, or `damage` bytes."""

    def __init__(self, payload: bytes):
        self.payload, self.cut_after, self.damage, self.ranges = payload, None, False, []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                start = 0
                if "Range" in self.headers:
                    owner.ranges.append(self.headers["Range"])
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    if start >= len(owner.payload):
                        self.send_response(416)
                        self.end_headers()
                        return
                body = owner.payload[start:]
                if owner.damage:
                    body = bytes([body[0] ^ 0xFF]) + body[1:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if owner.cut_after is not None:
                    self.wfile.write(body[:owner.cut_after])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the line goes dead mid-transfer
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/ETHEC.zip"


@pytest.fixture
def served(tmp_path):
    (tmp_path / "src").mkdir()
    archive = _ethec_zip(tmp_path / "src" / "ETHEC.zip")
    payload = archive.read_bytes()
    server = Server(payload)
    source = Source("ETHEC.zip", server.url, hashlib.md5(payload).hexdigest(), "test")
    yield server, source
    server.server.shutdown()


def test_a_cut_transfer_resumes_and_the_dataset_reads(served, tmp_path):
    server, source = served
    server.cut_after = 3000
    with pytest.raises(WingspanError, match="stopped after 3000 of .*bytes"):
        download_dataset("ethec", tmp_path / "data", source=source, progress=False)
    part = tmp_path / "data" / "ETHEC.zip.part"
    assert part.stat().st_size == 3000  # kept, to continue from
    server.cut_after = None
    root = download_dataset("ethec", tmp_path / "data", source=source, progress=False)
    assert server.ranges == ["bytes=3000-"]  # it asked for the rest only
    assert root == tmp_path / "data" / "ethec" / "ETHEC_dataset"
    dataset = read_dataset(root)
    assert len(dataset.table) == 12 and set(dataset.table["split"]) == {"train", "val", "test"}
    # Done once: a second call finds it and fetches nothing.
    assert download_dataset("ethec", tmp_path / "data", source=source, progress=False) == root
    assert server.ranges == ["bytes=3000-"]


def test_a_damaged_download_is_refused_kept_and_fetched_afresh(served, tmp_path, run_cli):
    server, source = served
    server.damage = True
    with pytest.raises(WingspanError, match=f"md5 is [0-9a-f]{{32}}, the published one is "
                                            f"{source.md5}"):
        download_dataset("ethec", tmp_path / "data", source=source, progress=False)
    assert (tmp_path / "data" / "ETHEC.zip.bad").is_file()  # kept for inspection
    assert not (tmp_path / "data" / "ethec").exists()  # nothing unpacked
    server.damage = False
    root = download_dataset("ethec", tmp_path / "data", source=source, progress=False)
    assert read_dataset(root).format == "ethec"
    code, _, err = run_cli("data", "download", "imagenet", "--to", tmp_path / "x")
    assert code == 2 and "Unknown dataset 'imagenet'" in err


def test_url_may_be_an_archive_already_on_this_machine(tmp_path):
    (tmp_path / "src").mkdir()
    archive = _ethec_zip(tmp_path / "src" / "ETHEC.zip")
    source = Source("ETHEC.zip", "https://example.invalid/ETHEC.zip",
                    hashlib.md5(archive.read_bytes()).hexdigest(), "test")
    root = download_dataset("ethec", tmp_path / "data", url=str(archive), source=source,
                            progress=False)
    assert len(read_dataset(root).table) == 12
    with pytest.raises(WingspanError, match="neither a URL nor a file"):
        download_dataset("ethec", tmp_path / "other", url=str(tmp_path / "nope.zip"),
                         source=source, progress=False)
    # An empty folder where the dataset is unpacked was never a download: said so, not
    # that the archive's layout may have changed.
    (tmp_path / "empty" / "ethec").mkdir(parents=True)
    with pytest.raises(WingspanError, match="is an empty folder, where the unpacked dataset "
                                            "goes") as e:
        download_dataset("ethec", tmp_path / "empty", url=str(archive), source=source,
                         progress=False)
    assert "Remove it" in e.value.hint
