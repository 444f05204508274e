import hashlib
import json

import pyarrow as pa
import pytest

from cmevlm.config import StorageConfig
from cmevlm.storage import Storage, join


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """The same tests on local disk and on a moto S3 server over HTTP."""
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("s3_bucket") + "/prefix/run"


def test_bytes_and_json_round_trip(root):
    st = Storage()
    st.write_bytes(join(root, "a/b.bin"), b"\x00\x01abc")
    assert st.read_bytes(join(root, "a/b.bin")) == b"\x00\x01abc"
    st.write_json(join(root, "x.json"), {"k": [1, 2]})
    assert st.read_json(join(root, "x.json")) == {"k": [1, 2]}
    assert st.exists(join(root, "x.json")) and not st.exists(join(root, "nope.json"))


def test_overwrite_is_whole_and_leaves_no_temp_files(root):
    st = Storage()
    uri = join(root, "f.txt")
    st.write_text(uri, "first version, long")
    st.write_text(uri, "second")
    assert st.read_text(uri) == "second"
    assert st.list_files(root) == [uri]


def test_list_files_recursive_sorted_with_suffix(root):
    st = Storage()
    for p in ["z.parquet", "a/1.parquet", "a/2.txt", "b/c/3.parquet"]:
        st.write_bytes(join(root, p), b"x")
    assert st.list_files(root, ".parquet") == [join(root, p) for p in ["a/1.parquet", "b/c/3.parquet", "z.parquet"]]
    assert st.list_files(join(root, "missing")) == []


def test_append_text(root):
    st = Storage()
    uri = join(root, "log.jsonl")
    st.append_text(uri, "1\n")
    st.append_text(uri, "2\n")
    assert st.read_appended(uri) == "1\n2\n"


def test_two_writers_appending_at_once_keep_every_line(root):
    """On S3 each append is an object of its own (no read-modify-write): two writers with their
    own clients, 20 lines each at the same time, keep 40 of 40 (before: 20 of 40)."""
    import threading

    uri = join(root, "reviews.jsonl")

    def writer(name):
        st = Storage()
        for i in range(20):
            st.append_text(uri, json.dumps({"writer": name, "i": i}) + "\n", fsync=True)

    threads = [threading.Thread(target=writer, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = [json.loads(x) for x in Storage().read_appended(uri).splitlines()]
    assert sorted((x["writer"], x["i"]) for x in lines) == sorted((w, i) for w in "ab" for i in range(20))
    assert [x["i"] for x in lines if x["writer"] == "a"] == list(range(20))  # each writer's order is kept


APPEND_UNDER_LIMIT = """
import resource, sys
from cmevlm.storage import Storage
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
try:
    Storage().append_text(sys.argv[1], "x" * 100 + "\\n", fsync=True)
except OSError as e:
    print("raised", e.errno)
else:
    print("saved")
"""


def test_an_append_that_cannot_be_written_whole_raises_and_leaves_no_torn_line(tmp_path):
    """A file-size limit (as a full disk) mid-line: an error, and the file as it was."""
    import subprocess
    import sys

    f = tmp_path / "reviews.jsonl"
    f.write_text('{"ok": 1}\n')
    size = f.stat().st_size
    out = subprocess.run([sys.executable, "-c", APPEND_UNDER_LIMIT, str(f), str(size + 40)], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("raised") and f.read_text() == '{"ok": 1}\n'


def test_parquet_round_trip(root):
    st = Storage()
    t = pa.table({"id": ["a", "b", "c"], "v": [1, 2, 3], "img": [b"\x89PNG", b"", b"zz"]})
    st.write_parquet(join(root, "shards/0.parquet"), t)
    st.write_parquet(join(root, "shards/1.parquet"), t.slice(0, 1))
    back = st.read_parquet(join(root, "shards"))
    assert back.num_rows == 4 and back.column("v").to_pylist() == [1, 2, 3, 1]


def test_manifest_marks_a_stage_complete(root):
    st = Storage()
    stage = join(root, "frames")
    assert not st.is_complete(stage)
    st.write_parquet(join(stage, "part-0.parquet"), pa.table({"x": list(range(5))}))
    st.write_bytes(join(stage, "extra.bin"), b"hello")
    assert not st.is_complete(stage)  # files alone do not make a stage complete
    m = st.write_manifest(stage, accepted=5, quarantined=0)
    assert st.is_complete(stage)
    files = {e["path"]: e for e in m["files"]}
    assert files["part-0.parquet"]["rows"] == 5
    assert files["extra.bin"]["sha256"] == hashlib.sha256(b"hello").hexdigest()
    on_disk = json.loads(st.read_bytes(join(stage, "manifest.json")))
    assert on_disk["accepted"] == 5 and on_disk["complete"] is True
    st.delete(join(stage, "extra.bin"))
    assert not st.is_complete(stage)  # a listed file went missing


def test_delete_folder(root):
    st = Storage()
    st.write_bytes(join(root, "d/1"), b"1")
    st.write_bytes(join(root, "d/e/2"), b"2")
    st.delete(join(root, "d"))
    assert st.list_files(join(root, "d")) == []
    st.delete(join(root, "d"))  # absent: no error


def test_s3_config_beats_environment(s3_server, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # nothing listens there
    st = Storage(StorageConfig(endpoint=s3_server, access_key_id="testing", secret_access_key="testing"))
    st.write_bytes(s3_bucket + "/k", b"v")
    assert st.read_bytes(s3_bucket + "/k") == b"v"


def test_local_dir_downloads_s3_prefix_once(s3_bucket, tmp_path):
    st = Storage(StorageConfig(cache_dir=str(tmp_path / "cache")))
    st.upload_dir(_tree(tmp_path / "src"), s3_bucket + "/model")
    local = st.local_dir(s3_bucket + "/model")
    assert (local / "config.json").read_text() == "{}" and (local / "sub/w.bin").read_bytes() == b"w"
    st.delete(s3_bucket + "/model/config.json")
    assert st.local_dir(s3_bucket + "/model") == local  # cached: no second download
    assert (local / "config.json").exists()


def _tree(p):
    (p / "sub").mkdir(parents=True)
    (p / "config.json").write_text("{}")
    (p / "sub/w.bin").write_bytes(b"w")
    return p
