"""Outputs on the user's storage: a plain path is written in place, a URI through pyarrow.fs.

`file://` URIs take the same road as `s3://` (stage locally, upload), so they stand in for an
object store here; tests/e2e/test_multinode.py writes a whole run to one from another node.
"""

import pickle

import pyarrow.fs as pafs
import pytest

from rayrlhf.cluster.storage import Storage


def test_a_relative_path_is_made_absolute_and_written_in_place(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage = Storage("outputs/run")
    assert storage.local_path == tmp_path / "outputs" / "run"
    assert storage.join("final") == f"{tmp_path}/outputs/run/final"  # what a learner on another node receives
    with storage.writable_dir() as out:
        assert out == storage.local_path
        (out / "a.txt").write_text("a")
    assert (tmp_path / "outputs" / "run" / "a.txt").read_text() == "a"


def test_a_uri_is_staged_then_uploaded_and_keeps_what_is_there(tmp_path):
    root = tmp_path / "bucket"
    storage = Storage(f"file://{root}/run/")
    assert storage.local_path is None and storage.location == f"file://{root}/run"
    storage.write_text("config.yaml", "seed: 0\n")
    final = pickle.loads(pickle.dumps(storage.child("final")))  # as it travels to learner rank 0
    assert str(final) == f"file://{root}/run/final"
    with final.writable_dir() as staging:
        assert staging != root / "run" / "final"
        (staging / "sub").mkdir()
        (staging / "sub" / "weights.bin").write_bytes(b"\x00\x01")
        assert not (root / "run" / "final").exists()  # nothing lands before the block ends
    assert not staging.exists()  # the staging copy is gone
    assert (root / "run" / "final" / "sub" / "weights.bin").read_bytes() == b"\x00\x01"
    assert storage.read_text("config.yaml") == "seed: 0\n" and storage.exists("final/sub/weights.bin")
    assert not storage.exists("nothing")


def test_a_failed_write_uploads_nothing(tmp_path):
    storage = Storage(f"file://{tmp_path}/run")
    with pytest.raises(RuntimeError), storage.writable_dir() as staging:
        (staging / "half.bin").write_bytes(b"x")
        raise RuntimeError("the writer died")
    assert pafs.LocalFileSystem().get_file_info(str(tmp_path / "run" / "half.bin")).type == pafs.FileType.NotFound
