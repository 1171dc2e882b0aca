"""The JSON file written beside a source's shards: what each shard holds and a checksum of it.

It lets a user see a corpus without opening tars (sample counts, languages, tasks), lets tooling
check a copy against the original (sha256), and records the tokenizer trained on the corpus.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class ShardInfo:
    file: str  # relative to the manifest's folder
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    source: str
    tasks: tuple[str, ...]
    languages: tuple[str, ...]
    shards: tuple[ShardInfo, ...]
    # Brace pattern over the shard files, ready for a mixture's ``shards:`` field.
    pattern: str
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> examples not written
    tokenizer: str | None = None  # relative to the manifest's folder, or absolute
    # key -> {"frames", "fps", "duration_s"} of each video sample (fps and duration null where
    # a video states no frame rate)
    videos: dict[str, dict[str, float | None]] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def read(cls, path: str | Path) -> Manifest:
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        try:
            data = json.loads(path.read_text())
            data["shards"] = tuple(ShardInfo(**s) for s in data["shards"])
            data["tasks"], data["languages"] = tuple(data["tasks"]), tuple(data["languages"])
            return cls(**data)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a readable shard manifest ({exc})") from None

    def verify(self, folder: str | Path) -> list[str]:
        """Shard files that are missing or whose size or sha256 differ from the manifest."""
        bad = []
        for shard in self.shards:
            path = Path(folder) / shard.file
            if not path.is_file() or path.stat().st_size != shard.bytes:
                bad.append(shard.file)
            elif file_sha256(path) != shard.sha256:
                bad.append(shard.file)
        return bad


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
