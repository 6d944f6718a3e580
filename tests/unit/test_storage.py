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


class ListsAHostileKey:
    """A stand-in for an object store whose listing holds keys a path could not: S3 stores
    `run/../../evil` as it is. It wraps a real local filesystem and adds the keys `extra` names."""

    def __init__(self, real: pafs.FileSystem, extra: list[str]) -> None:
        self.real, self.extra = real, extra

    def get_file_info(self, selector):
        return [*self.real.get_file_info(selector), *(pafs.FileInfo(key, type=pafs.FileType.File) for key in self.extra)]

    def open_input_stream(self, path):
        import io
        return io.BytesIO(b"planted") if path in self.extra else self.real.open_input_stream(path)


@pytest.mark.parametrize("hostile", ["run/../../evil", "run/sub/../../../evil", "elsewhere/evil"])
def test_a_listed_key_outside_the_folder_is_refused_by_name(tmp_path, hostile):
    storage = Storage(f"file://{tmp_path}/bucket/run")
    storage.write_text("good.txt", "ok")
    key = f"{tmp_path}/bucket/{hostile}"
    storage.filesystem = ListsAHostileKey(storage.filesystem, [key])
    local = tmp_path / "a" / "b" / "local"
    with pytest.raises(ValueError, match="would be written outside") as refused:
        storage.download(local)
    assert repr(key) in str(refused.value)
    assert not list(tmp_path.rglob("evil")) and not local.exists()  # refused before anything was written
    with pytest.raises(ValueError, match="would be written outside"), storage.readable_dir():
        pass


def test_a_learner_rank_downloads_only_its_own_deepspeed_files(tmp_path):
    """DeepSpeed's names (ZeRO 1-2: one model file all ranks load, one optimizer shard per rank; ZeRO 3:
    the weights sharded too; bf16 shards carry a prefix); rank 1 must not take rank 10's shard."""
    from rayrlhf.jobs.run.checkpoint import RankFiles

    shared = ["state/mp_rank_00_model_states.pt", "zero_to_fp32.py", "latest"]
    per_rank = {rank: [f"state/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
                       f"state/zero_pp_rank_{rank}_mp_rank_00_model_states.pt",
                       f"state/bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"] for rank in (0, 1, 10)}
    storage = Storage(f"file://{tmp_path}/bucket/run/learner")
    for name in [*shared, *(f for files in per_rank.values() for f in files)]:
        storage.write_text(name, name)
    for rank in (0, 1, 10):
        source = pickle.loads(pickle.dumps(storage.only(RankFiles(rank))))  # as it travels to the rank
        with source.readable_dir() as folder:
            got = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
            assert got == sorted([*shared, *per_rank[rank]])
            assert (folder / per_rank[rank][0]).read_text() == per_rank[rank][0]
    with storage.readable_dir() as folder:  # unnarrowed: everything
        assert len([p for p in folder.rglob("*") if p.is_file()]) == len(shared) + 9
    local = Storage(tmp_path / "bucket" / "run" / "learner").only(RankFiles(0))
    with local.readable_dir() as folder:  # a path is read in place
        assert folder == tmp_path / "bucket" / "run" / "learner"
