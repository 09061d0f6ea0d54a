import pytest

from deo_cli.errors import OutputExistsError
from deo_cli.io.atomic import atomic_output, check_output


def test_atomic_output_commits_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    with atomic_output(target) as tmp:
        tmp.write_text("done")
        assert not target.exists() and tmp.name.startswith(".out.partial-")
    assert target.read_text() == "done"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_output_removes_partial_file_on_error(tmp_path):
    target = tmp_path / "out.tif"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            (tmp.parent / (tmp.name + ".aux.xml")).write_text("side file")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(OutputExistsError, match="already exists. Pass --overwrite"):
        check_output(target)
    with atomic_output(target, overwrite=True) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_atomic_output_replaces_folders(tmp_path):
    target = tmp_path / "emb.zarr"
    target.mkdir()
    (target / "old").write_text("x")
    with atomic_output(target, overwrite=True) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("y")
    assert [p.name for p in target.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["emb.zarr"]


def test_output_folder_that_cannot_be_created_is_a_user_error(tmp_path):
    from deo_cli.errors import OutputError
    from deo_cli.io.atomic import ensure_folder

    blocker = tmp_path / "results"
    blocker.write_text("a file, not a folder")
    with pytest.raises(OutputError, match="a file is in the way") as err:
        check_output(blocker / "emb" / "scene.tif")
    assert "Choose an output folder you can write to" in err.value.one_line()
    assert blocker.read_text() == "a file, not a folder"
    nested = ensure_folder(tmp_path / "a" / "b")
    assert nested.is_dir() and nested == tmp_path / "a" / "b"
    assert check_output(nested / "x.tif") == nested / "x.tif"


def test_write_text_atomic_leaves_nothing_when_the_write_fails(tmp_path, monkeypatch):
    from pathlib import Path

    from deo_cli.io.atomic import write_text_atomic

    target = tmp_path / "state.json"
    assert write_text_atomic(target, "one") == target and target.read_text() == "one"

    def full(self, *args, **kwargs):
        open(self, "w").close()  # the file was created, then the disk filled up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError, match="No space"):
        write_text_atomic(target, "two")
    monkeypatch.undo()
    assert target.read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
