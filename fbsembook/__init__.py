"""fbsembook: the machinery of the fbsemlib book (the ``book`` extra). It imports
:mod:`fbsemlib`; the library never imports it.

===================  ==================================================================
``profiles``         the profiles (smoke | cpu | paper), chapter parameters, the cache
``chapters``         the chapters of ``_toc.yml``, their parameters cells
``execute``          running the chapters with papermill
``publish``          the HTML with Jupyter Book, nbval references
``presentation``     executed chapters: folded plumbing, the "Rerun this chapter" box
``sphinx_ext``       the book's Sphinx extension: the introduction's chapter list
``build``            ``fbsem book {build,execute,run,html}``
``experiments``      cached datasets, trained runs and evaluations; named runs
``requests``         the cached results that several chapters ask for, in one place
``analysis``         inspecting trained nets, several runs, out-of-distribution data
``runviews``         batches of samples, module outputs, run facts
``report``           plots and tables
``memory``           peak training memory against K (cached sweeps)
``verdicts``         verdict functions and the book's thresholds
``claims``           the papers' claims as data and their assessment
``stats``            paired margins, hierarchical bootstrap, TOST, spread ratios, Holm
``rules``            the verdict rules fixed before running (``claims_rules.yaml``)
``bench``            ``fbsem bench ...``; ``bench_results`` reads its results
``cli``              the ``book`` and ``bench`` commands (entry points of ``fbsem``)
===================  ==================================================================

The chapters take their parameters with ``from fbsembook import pick_device,
profile_params``.
"""

from fbsembook.profiles import BookParams, PROFILES, book_root, cache_dir, pick_device, profile_params, resolve_profile

__all__ = ["BookParams", "PROFILES", "book_root", "cache_dir", "pick_device", "profile_params", "resolve_profile"]
