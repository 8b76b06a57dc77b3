"""Where built tokenizers are kept: the XDG convention, with GENRECAL_CACHE first."""

from pipeline.vlm.tiny import cache_root


def test_cache_root_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("GENRECAL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "genrecal"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the spec says relative values are ignored
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "genrecal"
    monkeypatch.setenv("GENRECAL_CACHE", str(tmp_path / "own"))
    assert cache_root() == tmp_path / "own"
