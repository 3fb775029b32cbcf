"""var_rt.files: every writer of the package goes through write_files, so its all-or-none promise is tested here."""
import pytest

from var_rt.errors import ConfigError
from var_rt.files import check_writable_folder, leftover_temp_files, write_file, write_files


def test_write_file_replaces_the_file_whole(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b"old")
    assert write_file(path, b"new", durable=True) == path
    write_file(tmp_path / "b.bin", lambda f: f.write(b"streamed"))
    assert path.read_bytes() == b"new" and (tmp_path / "b.bin").read_bytes() == b"streamed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin"]


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    """A writer that fails halfway (the second of three files): the existing file keeps its bytes, no file of
    the set appears, and neither temporary files nor the folders made for them are left."""
    (tmp_path / "kept.png").write_bytes(b"the user's file")

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    files = {tmp_path / "kept.png": b"replacement", tmp_path / "new" / "deep" / "x.png": fail,
             tmp_path / "y.png": b"never written"}
    with pytest.raises(OSError, match="disk full"):
        write_files(files)
    assert (tmp_path / "kept.png").read_bytes() == b"the user's file"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept.png"]


def test_leftover_temp_files_finds_current_and_older_names(tmp_path):
    names = [".0001.png.123.tmp", "0002.png.45.tmp", "0003.png", "notes.tmp"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    assert [p.name for p in leftover_temp_files(tmp_path, "*.png")] == names[:2]


def test_check_writable_folder(tmp_path):
    check_writable_folder(tmp_path / "not" / "yet", "--output-dir", "x")  # can be made
    assert list(tmp_path.iterdir()) == []  # nothing made, no probe left
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="--output-dir 'given': .* is a file"):
        check_writable_folder(tmp_path / "afile" / "sub", "--output-dir", "given")
    with pytest.raises(ConfigError, match="cannot write in '/proc'"):
        check_writable_folder("/proc/var-rt-x", "--npz", "/proc/var-rt-x/s.npz")


def test_a_failed_rename_leaves_no_temporary_file(tmp_path):
    """A folder where a file is to go fails at the rename: its temporary file was left behind."""
    (tmp_path / "b.png").mkdir()
    with pytest.raises(OSError):
        write_files({tmp_path / "a.png": b"a", tmp_path / "b.png": b"b"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]
    assert (tmp_path / "b.png").is_dir()
