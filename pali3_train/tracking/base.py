"""The interface the training loop calls, and the tracker that does nothing (non-main ranks,
``backend: none``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping, Protocol

Status = Literal["FINISHED", "FAILED", "KILLED"]


class Tracker(Protocol):
    """What the training loop calls. Every method returns quickly and never raises for tracking
    trouble: losing the tracker must not cost a training run."""

    @property
    def run_id(self) -> str | None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def close(self, status: Status = "FINISHED") -> None: ...


class NullTracker:
    """Non-main ranks and ``backend: none``: touches no file and imports no MLflow."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def close(self, status: Status = "FINISHED") -> None:
        pass

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
