"""flatten_config: the config as MLflow params, within MLflow's limits."""

import mlflow.utils.validation as mlflow_limits

from pali3_train.config import flatten_config
from pali3_train.config.flatten import PARAM_VALUE_LIMIT
from pali3_train.tracking import store
from tests.tracking.helpers import config_with_lists


def test_flatten_config_dotted_string_values_and_compact_json_lists():
    flat = flatten_config(config_with_lists())
    assert flat["model.vit.width"] == "1152"
    assert flat["train.lr"] == "0.0001"
    assert flat["train.adam_betas"] == "[0.9,0.999]"
    assert flat["tracking.tracking_uri"] == "None"
    assert flat["data.sources"].startswith('[{"name":"cc3m","shards":"cc-{000..009}.tar"')
    assert '"languages":["en","de"]' in flat["data.sources"]
    assert all(isinstance(v, str) for v in flat.values())
    assert not any(k.startswith("model.vit.") and k.count(".") != 2 for k in flat)
    secret = flatten_config({"tracking": {"tracking_uri": "https://bob:s3cret@mlflow:5000/x"}})
    assert secret == {"tracking.tracking_uri": "https://bob:***@mlflow:5000/x"}


def test_long_values_are_truncated_with_a_marker_at_mlflows_limits():
    assert PARAM_VALUE_LIMIT == mlflow_limits.MAX_PARAM_VAL_LENGTH
    assert store.TAG_VALUE_LIMIT == mlflow_limits.MAX_TAG_VAL_LENGTH
    assert store.KEY_LIMIT == mlflow_limits.MAX_ENTITY_KEY_LENGTH
    assert store.METRICS_PER_BATCH == mlflow_limits.MAX_METRICS_PER_BATCH
    assert store.PARAMS_TAGS_PER_BATCH == mlflow_limits.MAX_PARAMS_TAGS_PER_BATCH
    flat = flatten_config({"a": {"b": "x" * 10_000}, "empty": {}})
    assert len(flat["a.b"]) == PARAM_VALUE_LIMIT
    assert flat["a.b"].endswith("...[truncated from 10000 chars]")
    assert flat["empty"] == "{}"
