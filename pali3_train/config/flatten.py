"""The config as MLflow params (what the trainer logs at the start of a run)."""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

from pali3_train.config.loader import to_dict

# MAX_PARAM_VAL_LENGTH of mlflow.utils.validation in 3.17 (tests check it against the installed
# mlflow). pali3_train.tracking.store holds MLflow's other limits.
PARAM_VALUE_LIMIT = 6000


def flatten_config(cfg: Any) -> dict[str, str]:
    """The config as MLflow params: dotted keys (``model.vit.width``), string values, lists as
    compact JSON, values longer than MLflow accepts truncated with a marker (instead of failing)."""
    data = cfg if isinstance(cfg, Mapping) else to_dict(cfg)
    flat: dict[str, str] = {}
    _flatten(data, "", flat)
    return flat


def _flatten(data: Mapping[str, Any], prefix: str, out: dict[str, str]) -> None:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            _flatten(value, dotted + ".", out)
        elif isinstance(value, (list, tuple, Mapping)):
            out[dotted] = truncate(json.dumps(value, separators=(",", ":"), default=str))
        else:
            out[dotted] = truncate(_PASSWORD_IN_URL.sub(r"\1:***@", str(value)))


# ``scheme://user:password@host``: params are visible to everyone who can read the experiment.
_PASSWORD_IN_URL = re.compile(r"(://[^/:@\s]+):[^@/\s]+@")


def truncate(value: str, limit: int = PARAM_VALUE_LIMIT) -> str:
    if len(value) <= limit:
        return value
    marker = f"...[truncated from {len(value)} chars]"
    return value[: limit - len(marker)] + marker
