"""``fbsem book {build,execute,run,html}``: execute the chapters with papermill
(:mod:`fbsembook.execute`), then build the HTML with Jupyter Book (:mod:`fbsembook.publish`).

``execute`` runs every chapter of ``_toc.yml`` with the profile and the ``-p NAME VALUE``
overrides; ``run N`` one chapter; ``html`` publishes what was executed; ``build`` both.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from fbsemlib.errors import UserError
from fbsembook.chapters import find_chapter
from fbsembook.execute import execute, parse_parameter_values
from fbsembook.profiles import book_root, resolve_profile
from fbsembook.publish import html

__all__ = ["cmd_book"]


def _echo(msg: str) -> None:
    print(msg, flush=True)


def cmd_book(args) -> int:
    """``fbsem book {build,execute,run,html}``."""
    root = book_root()
    params = parse_parameter_values(args.parameter or [])
    p_profile = params.pop("profile", None)
    if p_profile is not None and args.profile and str(p_profile) != args.profile:
        raise UserError(f"--profile {args.profile} contradicts -p profile {p_profile}")
    try:
        profile = resolve_profile(args.profile or (str(p_profile) if p_profile is not None else None))
    except ValueError as e:
        raise UserError(str(e)) from None
    action = args.action
    if action == "run":
        if not args.chapter:
            raise UserError("fbsem book run needs a chapter (number or name), e.g. `fbsem book run 1 -p image_size 64`")
        results = execute([find_chapter(args.chapter, root)], profile, params, 1, root)
        bad = [r for r in results if r["status"] != "ok"]
        if bad:
            return 1
        _echo(f"wrote {Path(results[0]['output']).relative_to(root)}; `fbsem book html` publishes it")
        return 0
    if args.chapter:
        raise UserError(f"fbsem book {action} takes no chapter (use `fbsem book run {args.chapter}`)")
    if action in ("execute", "build"):
        t0 = time.perf_counter()
        results = execute(None, profile, params, args.jobs, root)
        bad = [r["name"] for r in results if r["status"] != "ok"]
        if bad:
            print(f"error: {len(bad)} chapter(s) failed: {', '.join(bad)}", file=sys.stderr)
            return 1
        if action == "execute":
            return 0
        rc = html(root)
        if rc == 0:
            _echo(f"book built in {time.perf_counter() - t0:.1f} s (profile {profile})")
        return rc
    if action == "html":
        if params:
            raise UserError("parameters (-p) apply to execution, not to `fbsem book html`")
        return html(root)
    raise UserError(f"unknown book action {action!r}")  # pragma: no cover
