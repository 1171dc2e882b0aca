"""WebDataset shards of WebLI-style task mixtures: writing them, generating a demo corpus, and
reading a weighted mixture of them with exactly-once epochs and exact resume."""
