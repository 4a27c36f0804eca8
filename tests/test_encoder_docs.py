"""README links work on a fresh clone: relative links stay inside the repository and exist."""
from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_links_resolve_inside_the_repository():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code is not links
    text = re.sub(r"`[^`]*`", "", text)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if re.match(r"[a-z]+://", link) or link.startswith("#"):
            continue
        path = os.path.normpath(os.path.join(ROOT, link.split("#")[0]))
        assert path.startswith(ROOT + os.sep) or path == ROOT, f"{link} leaves the repository"
        assert os.path.exists(path), f"{link} does not exist"
    assert "arxiv.org/abs/2410.10267" in text  # the paper, by a public reference
