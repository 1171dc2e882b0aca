"""The test corpus is written once per session (see corpus.py)."""

import pytest

from tests.data_pipeline.corpus import Corpus, write_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Corpus:
    return write_corpus(tmp_path_factory.mktemp("corpus"))
