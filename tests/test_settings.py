from pathlib import Path

from pipeline.settings import PROJECT_ROOT, Settings


def test_defaults(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for var in ("AGENTPIPE_HOME", "AGENTPIPE_DATA_DIR", "AGENTPIPE_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    s = Settings()
    assert s.home == tmp_path / "runs"
    shared = (PROJECT_ROOT.parent / "shared" / "data").resolve()
    assert s.resolved_data_dir == (shared if shared.is_dir() else s.home / "data")


def test_environment_and_yaml(monkeypatch, tmp_path):
    cfg = tmp_path / "agentpipe.yaml"
    cfg.write_text(f"home: {tmp_path / 'h'}\nmlflow_tracking_uri: http://127.0.0.1:5999\n"
                   "openai_api_key: sk-from-yaml-must-be-ignored\n")
    monkeypatch.setenv("AGENTPIPE_CONFIG", str(cfg))
    monkeypatch.setenv("AGENTPIPE_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    s = Settings()
    assert s.home == tmp_path / "h" and s.resolved_data_dir == tmp_path / "d"
    assert s.mlflow_tracking_uri == "http://127.0.0.1:5999"
    assert s.openai_api_key is None  # secrets come from the environment only
    monkeypatch.setenv("AGENTPIPE_HOME", str(tmp_path / "env-wins"))
    assert Settings().home == tmp_path / "env-wins"


def test_api_key_is_never_shown(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")
    s = Settings()
    assert s.openai_api_key.get_secret_value() == "sk-secret-123"
    assert "sk-secret-123" not in repr(s) and "sk-secret-123" not in str(s.model_dump())
    assert isinstance(s.home, Path)
