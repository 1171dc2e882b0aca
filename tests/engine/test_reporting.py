"""The progress bar's fields from a step's metrics (hand-worked values)."""

from pali3_train.engine.reporting import _bar_fields


def test_the_bar_shows_throughput_memory_and_mfu_where_known():
    metrics = {"loss": 1.23456, "lr": 3e-4, "samples_per_s": 100.4, "visual_tokens_per_s": 1000.0,
               "text_tokens_per_s": 234.0, "memory_gib": 3.14159, "mfu": 0.4123}  # fmt: skip
    expected = {"loss": "1.2346", "lr": "3.00e-04", "samples_s": "100", "tokens_s": "1,234",
                "mem_gib": "3.1", "mfu": "41.2%"}  # fmt: skip
    assert _bar_fields(metrics) == expected
    plain = {"loss": 2.0, "lr": 1e-3, "samples_per_s": 5.0}  # a CPU step: no peak, no MFU
    assert _bar_fields(plain) == {"loss": "2.0000", "lr": "1.00e-03", "samples_s": "5"}
