"""Rebuild .dvc/plots/page.html: DVC's plot page with vega, vega-lite and vega-embed inlined, so `dvc plots show`
and `dvc plots diff` render without internet (DVC's own page loads them from a CDN).

    python scripts/vendor_vega.py            # npm pack the pinned versions (npm registry), check, write the page
    python scripts/vendor_vega.py --from DIR # use tarballs already in DIR (vega-5.33.1.tgz, ...)

Each tarball is checked against the sha512 the npm registry published for it; the page is the only output
(.dvc/plots/VENDORED.md holds the versions and the licences, and is written by hand).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import subprocess
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / ".dvc" / "plots" / "page.html"
# (package, version, build file, npm integrity): load order matters (vega-embed needs vega and vega-lite)
PACKAGES = [
    ("vega", "5.33.1", "build/vega.min.js",
     "sha512-1fArfVDUqVbb5z8n+/nVQb+VNBzx8svY6CrsyTK4Ujm4yrd9I1auoKxBAPXLCavY1LcrbHUskQbGUP8gXOzyQw=="),
    ("vega-lite", "5.23.0", "build/vega-lite.min.js",
     "sha512-l4J6+AWE3DIjvovEoHl2LdtCUkfm4zs8Xxx7INwZEAv+XVb6kR6vIN1gt3t2gN2gs/y4DYTs/RPoTeYAuEg6mA=="),
    ("vega-embed", "6.29.0", "build/vega-embed.min.js",
     "sha512-PmlshTLtLFLgWtF/b23T1OwX53AugJ9RZ3qPE2c01VFAbgt3/GSNI/etzA/GzdrkceXFma+FDHNXUppKuM0U6Q=="),
]

# DVC fills {plot_divs} (and {refresh_tag}); the page has no {scripts} placeholder on purpose: that is where DVC
# would put its CDN <script> tags.
HEAD = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{refresh_tag}
<title>kd-prime plots</title>
<!-- Built by scripts/vendor_vega.py: VERSIONS inlined (BSD-3-Clause, see .dvc/plots/VENDORED.md),
     so this page needs no network. -->
<style>
body { font-family: sans-serif; margin: 16px; }
body > div { display: inline-block; vertical-align: top; margin: 8px; }
</style>
"""
TAIL = """</head>
<body>
{plot_divs}
</body>
</html>
"""


def integrity(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def build(tarballs: Path) -> str:
    scripts = []
    for name, version, member, expected in PACKAGES:
        tgz = tarballs / f"{name}-{version}.tgz"
        if integrity(tgz) != expected:
            raise SystemExit(f"{tgz}: sha512 differs from the npm registry's {expected}")
        with tarfile.open(tgz) as tar:
            js = tar.extractfile(f"package/{member}").read().decode("utf-8")
        js = re.sub(r"\n?//# sourceMappingURL=\S+\s*$", "", js)  # no reference to a file we do not ship
        for bad in ("</script", "{plot_divs}", "{scripts}", "{refresh_tag}"):
            if bad in js:
                raise SystemExit(f"{name}: contains {bad!r}, cannot be inlined into DVC's page template")
        scripts.append(f"<script>/* {name} {version} */\n{js}\n</script>\n")
    versions = ", ".join(f"{n} {v}" for n, v, _, _ in PACKAGES)
    return HEAD.replace("VERSIONS", versions) + "".join(scripts) + TAIL


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="src", type=Path, help="folder with the npm tarballs (default: npm pack)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = args.src
        if src is None:
            src = Path(tmp)
            subprocess.run(["npm", "pack", *(f"{n}@{v}" for n, v, _, _ in PACKAGES)], cwd=src, check=True)
        page = build(src)
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    tmp_page = PAGE.with_suffix(".html.tmp")
    tmp_page.write_text(page, encoding="utf-8")
    tmp_page.replace(PAGE)
    print(f"{PAGE.relative_to(ROOT)}: {len(page.encode()) / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
