"""Regenerate the checked-in JSON Schema files from the dataclasses.

    python -m schemas.generate          # rewrite schemas/*.schema.json
    python -m schemas.generate --check  # exit 1 if a checked-in file is stale
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from schemas.dataclass_io import json_schema
from schemas.manifest import CacheManifest
from schemas.shard import ShardIndex

HERE = Path(__file__).parent
SCHEMA_FILES = {
    "manifest.schema.json": (CacheManifest, "genrecal teacher cache manifest (manifest.json)"),
    "shard-index.schema.json": (ShardIndex, "genrecal teacher cache shard index (shards/<name>/index.json)"),
}


def render(cls: type, title: str) -> str:
    return json.dumps(json_schema(cls, title), indent=2) + "\n"


def main(argv: list[str]) -> int:
    stale = []
    for filename, (cls, title) in SCHEMA_FILES.items():
        path, text = HERE / filename, render(cls, title)
        if "--check" in argv:
            if not path.exists() or path.read_text() != text:
                stale.append(filename)
        else:
            path.write_text(text)
    if stale:
        print(f"stale schema file(s): {', '.join(stale)}; run python -m schemas.generate", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
