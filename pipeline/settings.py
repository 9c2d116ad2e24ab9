"""One place for the settings every stage needs.

Sources, highest priority first: keyword arguments, environment variables (``AGENTPIPE_*`` and the usual
``OPENAI_API_KEY`` / ``MLFLOW_TRACKING_URI``), an optional ``agentpipe.yaml`` (path in ``AGENTPIPE_CONFIG``,
else ``./agentpipe.yaml``), then the defaults below.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

#: The repository checkout this package lives in (``pipeline/..``).
PROJECT_ROOT = Path(__file__).resolve().parent.parent
#: Project-authored demo cases and the data manifest.
ASSETS_DIR = PROJECT_ROOT / "assets"


def _config_file() -> Path:
    return Path(os.environ.get("AGENTPIPE_CONFIG", "agentpipe.yaml"))


class Settings(BaseSettings):
    """Run root, data location, tracking and API endpoints. API keys come from the environment only."""

    model_config = SettingsConfigDict(env_prefix="AGENTPIPE_", extra="ignore", populate_by_name=True)

    home: Path = Field(default=Path("runs"), description="Run root (AGENTPIPE_HOME); every stage writes below it.")
    data_dir: Path | None = Field(
        default=None,
        description="Where the ToolEmu cases and the study's released runs are (AGENTPIPE_DATA_DIR). "
        "Default: ../shared/data beside the checkout when it exists, else <home>/data.",
    )
    mlflow_tracking_uri: str | None = Field(
        default=None, validation_alias=AliasChoices("AGENTPIPE_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI")
    )
    openai_base_url: str | None = Field(
        default=None, validation_alias=AliasChoices("AGENTPIPE_OPENAI_BASE_URL", "OPENAI_BASE_URL")
    )
    # How long an API model may hold one request; not part of any fingerprint (they change how long a failure
    # takes to show, not what an answer is).
    api_timeout_s: float = Field(default=300.0, gt=0, description="Seconds one API request attempt may take "
                                 "(AGENTPIPE_API_TIMEOUT_S).")
    api_retries: int = Field(default=6, ge=0, description="Retries of an API request after a timeout, a "
                             "connection error, 429 or 5xx (AGENTPIPE_API_RETRIES).")
    # Where a CPU training's memory goes, not what it computes: not part of any fingerprint.
    lean_cpu_training_memory: bool = Field(
        default=True, description="A CPU training maps blocks from 2 MiB on their own and hands freed memory back "
        "after each step: ~20 % lower peak memory, ~20 % slower steps (AGENTPIPE_LEAN_CPU_TRAINING_MEMORY; "
        "pipeline/training/cpu_memory.py).")
    # Never read from the YAML file (secrets do not belong in config files); never printed (SecretStr).
    openai_api_key: SecretStr | None = Field(default=None, validation_alias=AliasChoices("OPENAI_API_KEY"))

    @field_validator("home", "data_dir", mode="after")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        return v.expanduser().resolve() if v is not None else None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _config_file()
        if path.is_file():
            sources.append(_YamlWithoutSecrets(settings_cls, yaml_file=path))
        return tuple(sources)

    @property
    def resolved_data_dir(self) -> Path:
        """The data directory actually used (see ``data_dir``)."""
        if self.data_dir is not None:
            return self.data_dir
        shared = (PROJECT_ROOT.parent / "shared" / "data").resolve()
        return shared if shared.is_dir() else self.home / "data"


class _YamlWithoutSecrets(YamlConfigSettingsSource):
    def __call__(self) -> dict[str, Any]:
        data = super().__call__()
        return {k: v for k, v in data.items() if k.lower() != "openai_api_key"}


def get_settings() -> Settings:
    """The current settings. Not cached: long-lived processes (Airflow workers, tests) see environment changes.
    A value that does not parse is a ``ConfigError`` naming the setting."""
    from pydantic import ValidationError

    from pipeline.errors import ConfigError

    try:
        return Settings()
    except ValidationError as e:
        err = e.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else "?"
        raise ConfigError(f"setting {name} (AGENTPIPE_{name.upper()} or {_config_file()}): {err['msg']}, got "
                          f"{err.get('input')!r}") from None
