"""The atlas's outputs: atlas.html for people (one self-contained file: images inline, no
script, nothing loaded from elsewhere; names from the data autoescaped) and atlas.json."""
from __future__ import annotations

import json
from pathlib import Path

from ..io.files import Outputs, check_writable
from ..io.image import data_uri, render, thumbnail
from .atlas import Atlas, Reference

FILES = ("atlas.html", "atlas.json")
THUMBNAIL = 96


def _picture(reference: Reference) -> str:
    """The crop with the channel's conditional map over it."""
    return data_uri(thumbnail(render(reference.pixels, reference.heat), THUMBNAIL))


def html(found: Atlas) -> str:
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(Path(__file__).with_name("templates")),
                      autoescape=select_autoescape(default=True, default_for_string=True))
    pictures = {(c, kind, k): _picture(r) for c, concept in found.concepts.items()
                for kind, refs in (("r", concept.by_relevance), ("a", concept.by_activation))
                for k, r in enumerate(refs)}
    return env.get_template("atlas.html.j2").render(atlas=found, pictures=pictures)


def write(found: Atlas, folder: str | Path) -> dict[str, Path]:
    """atlas.html and atlas.json into `folder`: both or, on failure, neither."""
    folder = Path(folder)
    paths = {name: folder / name for name in FILES}
    check_writable(paths.values())
    page, data = html(found), json.dumps(found.to_dict(), indent=1)
    with Outputs() as outputs:
        outputs.write(paths["atlas.html"], lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
        outputs.write(paths["atlas.json"], lambda tmp: Path(tmp).write_text(data, encoding="utf-8"))
    return paths
