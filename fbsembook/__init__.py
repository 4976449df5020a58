"""fbsembook: the machinery of the fbsemlib book (the ``book`` extra).

Profiles and named experiments (:mod:`~fbsembook.experiments`), views of trained runs
(:mod:`~fbsembook.runviews`), analyses and claims of the chapters, benchmarks and the
build (execute the MyST notebooks with papermill, then Jupyter Book). It imports
:mod:`fbsemlib`; the library never imports it.
"""
