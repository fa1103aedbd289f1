"""A small report built once and written twice: Markdown beside its PNGs, and one HTML file
with the images embedded, so it can be mailed or opened anywhere without the folder."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from igpt.fileio import atomic_write_text

_STYLE = """body{font-family:system-ui,sans-serif;max-width:860px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}
th{background:#f3f3f3}img{max-width:100%;image-rendering:pixelated;border:1px solid #eee}
code{background:#f3f3f3;padding:0 3px}"""


def _inline_html(text: str) -> str:
    """Escape, then the two Markdown inlines the reports use: **bold** and `code`."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


class Report:
    def __init__(self, title: str):
        self.title = title
        self.blocks: list[tuple] = []

    def heading(self, text: str) -> None:
        self.blocks.append(("heading", text))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("paragraph", text))

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("table", header, rows))

    def image(self, name: str, alt: str, folder: Path) -> None:
        """An image (PNG, or an animated GIF) in `folder` referred to by `name`; a note instead if it was not made."""
        path = Path(folder) / name
        if path.is_file():
            self.blocks.append(("image", name, alt, path))
        else:
            self.blocks.append(("paragraph", f"({alt}: not produced)"))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, *rest in self.blocks:
            if kind == "heading":
                out += [f"## {rest[0]}", ""]
            elif kind == "paragraph":
                out += [rest[0], ""]
            elif kind == "table":
                header, rows = rest
                out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                out += ["| " + " | ".join(row) + " |" for row in rows] + [""]
            else:
                name, alt, _ = rest
                out += [f"![{alt}]({name})", ""]
        return "\n".join(out)

    def html(self) -> str:
        out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>",
               f"<style>{_STYLE}</style></head><body>", f"<h1>{html.escape(self.title)}</h1>"]
        for kind, *rest in self.blocks:
            if kind == "heading":
                out.append(f"<h2>{html.escape(rest[0])}</h2>")
            elif kind == "paragraph":
                out.append(f"<p>{_inline_html(rest[0])}</p>")
            elif kind == "table":
                header, rows = rest
                out.append("<table><tr>" + "".join(f"<th>{_inline_html(h)}</th>" for h in header) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in row) + "</tr>" for row in rows]
                out.append("</table>")
            else:
                _, alt, path = rest
                encoded = base64.b64encode(path.read_bytes()).decode("ascii")
                kind = {".gif": "gif", ".webp": "webp"}.get(path.suffix.lower(), "png")
                out.append(f"<p><img alt='{html.escape(alt)}' src='data:image/{kind};base64,{encoded}'></p>")
        out.append("</body></html>")
        return "\n".join(out)

    def write(self, markdown_path: Path, html_path: Path) -> None:
        atomic_write_text(markdown_path, self.markdown())
        atomic_write_text(html_path, self.html())
