"""Before anything starts, each source's first samples are decoded as its ``format`` says: an
img2dataset download read as pali3 shards (the default) is refused with one line that names the
field, the missing record field and what the samples hold, instead of passing the checks and
rejecting every sample once the job runs."""

from __future__ import annotations

import pytest
import webdataset as wds

from pali3_train.config import ConfigError
from pali3_train.engine.checks import check_data
from tests.data_pipeline.corpus import example, img2dataset_sample


def _laion(corpus, **options) -> list[dict]:
    source = corpus.sources()[-1]  # delta: img2dataset shards
    assert source["format"] == "img2dataset"
    return [*corpus.sources()[:1], {**source, **options}]


def test_img2dataset_shards_read_as_pali3_are_refused_naming_what_they_hold(corpus):
    cfg = corpus.config(_laion(corpus, format="pali3"))
    with pytest.raises(ConfigError) as caught:
        check_data(cfg, "mix.yaml")
    message = str(caught.value)
    assert message.startswith("mix.yaml: data.sources[1].format: all 4 samples read from ")
    assert (
        "with format 'pali3': missing_field: 'caption' is a str, not a {language: text}" in message
    )
    assert "[members: .json, .txt, .webp]" in message


def test_a_mapping_to_a_key_the_metadata_lacks_is_refused_with_the_keys_it_has(corpus):
    cfg = corpus.config(_laion(corpus, fields={"text": "json:TEXT"}))
    with pytest.raises(ConfigError, match=r"data.sources\[1\].format: .*no 'TEXT' key in .json "
                        r"\(keys: caption, height, key, status, url, width\)"):  # fmt: skip
        check_data(cfg, "mix.yaml")


def test_the_same_shards_pass_with_format_img2dataset(corpus):
    assert check_data(corpus.config(_laion(corpus)), "mix.yaml").startswith("2 sources")


def test_one_usable_sample_is_enough(corpus, tmp_path):
    samples = [img2dataset_sample(example("cats", i, image_format="WEBP")) for i in range(6)]
    for sample in samples[1:]:
        del sample["txt"]
    with wds.TarWriter(str(tmp_path / "cats.tar")) as tar:
        for sample in samples:
            tar.write(sample)
    cats = {"name": "cats", "shards": str(tmp_path / "cats.tar"), "task": "caption",
            "format": "img2dataset"}  # fmt: skip
    check_data(corpus.config([cats]), "mix.yaml")  # the data-quality counters judge the rest


def test_remote_shards_are_read_only_by_the_dry_run(corpus):
    local = _laion(corpus, format="pali3")[1]
    piped = {**local, "shards": f"pipe:cat {local['shards'].replace('{00000..00003}', '00000')}"}
    cfg = corpus.config([piped])
    check_data(cfg, "mix.yaml")  # a real start: every rank runs it; a bucket is not opened
    with pytest.raises(ConfigError, match="would be rejected"):
        check_data(cfg, "mix.yaml", remote=True)


def test_image_shards_read_as_a_video_source_are_refused_naming_what_they_hold(corpus):
    alpha, *_ = corpus.sources()
    clips = {**alpha, "name": "clips", "task": "video_caption", "frame_stride_s": 0.5}
    words = r"no .mp4/.webm or .frame0000.jpg member \(members: .json, .png\)"
    with pytest.raises(ConfigError, match=r"data.sources\[1\].format: all 5 samples .*" + words):
        check_data(corpus.config([alpha, clips]), "mix.yaml")


def test_a_video_source_passes_beside_image_sources(corpus):
    assert check_data(corpus.config(), "mix.yaml").startswith("5 sources")
