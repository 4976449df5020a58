"""The book's Sphinx extension (``_config.yml``: ``sphinx: extra_extensions``):

* the ``chapter-list`` directive, the list of the chapters of ``_toc.yml`` with each one's
  title and first paragraph, read from its MyST source when the HTML is built, so the
  introduction can never list a chapter that is not there, or miss one. In a MyST page::

      ```{chapter-list}
      ```

* every page's scripts de-duplicated: sphinx-thebe 0.3.1 adds its inline configuration
  (``const THEBE_JS_URL = ...``) twice under Jupyter Book, and the second copy is a
  JavaScript error in the reader's console.
"""

from __future__ import annotations

import re
from pathlib import Path

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective

from fbsembook.chapters import Chapter, chapters

__all__ = ["chapter_summary", "chapter_list_markdown", "ChapterList", "dedupe_scripts", "setup"]

_NOT_PROSE = ("```", ":::", "(", "+++", "<", "|", "$$", "{")


def chapter_summary(source: Path) -> tuple[str, str]:
    """``(title, first paragraph)`` of a chapter's MyST source (front matter, code and
    directives skipped); the paragraph's lines are joined by spaces."""
    text = Path(source).read_text()
    text = re.sub(r"\A---\n.*?\n---\n", "", text, flags=re.S)
    lines = text.splitlines()
    title = next((re.sub(r"^#\s+", "", line).strip() for line in lines if re.match(r"#\s+\S", line)), None)
    if title is None:
        raise ValueError(f"{source}: no '# title' line")
    start = next(i for i, line in enumerate(lines) if re.match(r"#\s+\S", line)) + 1
    para: list[str] = []
    fence = None  # the opening of the code block / directive being skipped
    for line in lines[start:]:
        s = line.strip()
        if fence is not None:
            if re.fullmatch(re.escape(fence) + r"\s*", s):
                fence = None
            continue
        if not s:
            if para:
                break
            continue
        if not para:
            opening = re.match(r"(`{3,}|:{3,})", s)
            if opening:
                fence = opening.group(1)
                continue
            if s.startswith(_NOT_PROSE) or s.startswith("#"):
                continue
        para.append(s)
    summary = " ".join(para)
    summary = re.sub(r"\s*\{glue(?::\w+)?\}`[^`]*`", "", summary)  # a chapter's glued answer lives on its page
    if not re.search(r"[.!?)]$", summary):  # the paragraph runs on into an equation or a list
        ends = [m.end() for m in re.finditer(r"[.!?](?=\s)", summary)]
        summary = summary[: ends[-1]] if ends else summary
    return title, summary


def chapter_list_markdown(root: Path, chs: list[Chapter] | None = None) -> str:
    """The MyST text of the list: one numbered item per chapter, its title linking to it."""
    items = []
    for i, c in enumerate(chapters(root) if chs is None else chs, start=1):
        title, summary = chapter_summary(c.source)
        number = c.number if c.number is not None else i
        items.append(f"{number}. **{{doc}}`{title} </{c.executed.parent.relative_to(root).as_posix()}/{c.name}>`**  \n"
                     f"   {summary}")
    return "\n".join(items)


class ChapterList(SphinxDirective):
    """``{chapter-list}``: the chapters of ``_toc.yml``, titles and first paragraphs."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        root = Path(self.env.srcdir)
        chs = chapters(root)
        for c in chs:
            self.env.note_dependency(str(c.source))
        self.env.note_dependency(str(root / "_toc.yml"))
        container = nodes.container(classes=["fbsem-chapter-list"])
        text = chapter_list_markdown(root, chs)
        self.state.nested_parse(StringList(text.splitlines(), source="_toc.yml"), self.content_offset, container)
        return [container]


def dedupe_scripts(app, pagename, templatename, context, doctree) -> None:
    """``html-page-context``: drop the repeated ``<script>`` entries of a page (same file,
    same attributes and inline body), keeping the first."""
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, kept = set(), []
    for js in scripts:
        # an inline script's file is None or "" depending on who added it
        key = (str(getattr(js, "filename", js) or ""),
               tuple(sorted((k, str(v)) for k, v in (getattr(js, "attributes", None) or {}).items())))
        if key not in seen:
            seen.add(key)
            kept.append(js)
    scripts[:] = kept


def setup(app):
    app.add_directive("chapter-list", ChapterList)
    # late: after every extension has added its scripts
    app.connect("html-page-context", dedupe_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
