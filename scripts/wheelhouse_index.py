"""Write the find-links pages of a wheelhouse: index.html listing every gradfuse wheel, and one
page per torch build (pt213cpu.html, pt214cu130.html) listing only the wheels built for it.

Given every wheel, pip takes the newest one and, to meet its pin (torch==2.14.*), replaces the
installed torch; and the pin does not name the flavor. A torch build's page offers only its own
wheels (as PyG's per-torch pages do). Links carry the sha256 so pip checks downloads.

    python scripts/wheelhouse_index.py WHEELHOUSE
"""

from __future__ import annotations

import hashlib
import html
import re
import sys
from pathlib import Path
from urllib.parse import quote

# gradfuse-0.1.0+pt214cu130-cp311-cp311-manylinux_2_35_x86_64.whl -> torch build "pt214cu130"
WHEEL_NAME = re.compile(r"^gradfuse-[^-+]+\+(?P<build>pt\d+(?:cpu|cu\d+))-.+\.whl$")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _page(title: str, wheels: list[Path], hashes: dict[Path, str]) -> str:
    links = "\n".join(
        f'<a href="{quote(w.name)}#sha256={hashes[w]}">{html.escape(w.name)}</a><br>'
        for w in wheels
    )
    return (
        f"<!DOCTYPE html>\n<html><head><title>{html.escape(title)}</title></head><body>\n"
        f"<h1>{html.escape(title)}</h1>\n{links}\n</body></html>\n"
    )


def write_pages(wheelhouse: Path) -> list[Path]:
    """Write index.html and the per-torch-build pages; return the pages written."""
    wheels = sorted(w for w in wheelhouse.glob("gradfuse-*.whl") if WHEEL_NAME.match(w.name))
    if not wheels:
        raise SystemExit(f"wheelhouse_index: no gradfuse-*+pt*.whl wheels in {wheelhouse}")
    hashes = {w: _sha256(w) for w in wheels}
    pages = {"index.html": ("gradfuse wheels", wheels)}
    for build in sorted({WHEEL_NAME.match(w.name)["build"] for w in wheels}):
        chosen = [w for w in wheels if WHEEL_NAME.match(w.name)["build"] == build]
        pages[f"{build}.html"] = (f"gradfuse wheels for torch {build}", chosen)
    for stale in wheelhouse.glob("*.html"):
        if stale.name not in pages:
            stale.unlink()
    written = []
    for name, (title, chosen) in pages.items():
        (wheelhouse / name).write_text(_page(title, chosen, hashes))
        written.append(wheelhouse / name)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    for page in write_pages(Path(sys.argv[1])):
        print(page)
