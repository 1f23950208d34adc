"""GGUF files as --model: where their converted folder goes, and a clear error for a missing file."""
import pytest

from rabit.models import gguf_folder, load_model, resolve_model_path


def test_missing_gguf_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file .*nope.gguf not found"):
        resolve_model_path(str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_model(str(tmp_path / "nope.gguf"))


def test_gguf_folder_is_keyed_by_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("RABIT_CACHE", str(tmp_path / "cache"))
    a = tmp_path / "m.gguf"
    a.write_bytes(b"GGUF" + bytes(60))
    first = gguf_folder(a)
    assert first.parent == tmp_path / "cache" / "models" and first.name.startswith("m-")
    assert gguf_folder(a) == first
    a.write_bytes(b"GGUF" + bytes(61))          # another file under the same name: another folder
    assert gguf_folder(a) != first
