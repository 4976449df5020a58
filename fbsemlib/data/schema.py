"""The on-disk format of a simulated dataset: its name, version, splits and layout.

Layout of a dataset folder (written by :func:`fbsemlib.data.simulate.simulate_dataset`
through the writer of :mod:`fbsemlib.data.format`)::

    DIR/
      manifest.json          written last; lists every file with its SHA-256 and size,
                             the split of every subject, the recipe and its hash, the
                             geometry, the image grid, the unrolled schedule, versions
      subject-0000.h5        one HDF5 file per subject (all its 2D slices / rotations
      subject-0001.h5        and noise realisations)
      ...

A folder without a readable ``manifest.json`` is not a dataset (an interrupted
``fbsem simulate`` leaves its work in ``DIR.tmp-<recipe hash>`` instead, and the next run
with the same recipe resumes from there).

One subject file (``N`` = images = slices x rotations, ``S`` = samples = ``N`` x noise
realisations, ``K`` = unrolled modules = iterations x subsets, images ``(Z, Y, X)``,
sinograms ``(P, V, R)`` = ``(planes, views, radial)``; all images float32 unless noted)::

    /                       attrs: format, format_version, subject, split, subject_seed,
                            recipe_hash, recipe (JSON), geometry (JSON), grid (JSON),
                            num_iterations, num_subsets, num_images, num_samples,
                            fbsemlib_version, library_versions (JSON), created
    /images/activity        (N, Z, Y, X)   true activity (phantom units, e.g. GM ~ 96)
    /images/mu_map          (N, Z, Y, X)   attenuation coefficients, 1/mm
    /images/mr              (N, Z, Y, X)   synthetic T1 MR image
    /images/brain_mask      (N, Z, Y, X)   uint8 (0/1)
    /images/lesion_mask_pet (N, Z, Y, X)   uint8 labels: 0 = no lesion, i + 1 = lesion i of
                                           lesion_info[n] (present in PET; kind, contrast there)
    /images/lesion_mask_mr  (N, Z, Y, X)   uint8 labels, the same for the MR lesions
    /images/targets         (N, K, Z, Y, X) iteration-dependent targets: OSEM sub-iterate
                                           k = 1..K of the noise-free data ``ybar``
    /images/target_final    (N, Z, Y, X)   high-count reference reconstruction
    /images/{slice_index, rotation_deg, counts, trues, scale, seed}    (N,) metadata
            attrs: lesion_info (JSON list, one entry per image), phantom_params (JSON)
    /sinograms/multiplicative (N, P, V, R) ``m = t n a``: scale x normalisation x attenuation
    /sinograms/attenuation  (N, P, V, R)   ``a = exp(-A mu)``
    /sinograms/additive     (N, P, V, R)   ``b`` = randoms + scatter (expected counts)
    /sinograms/ybar         (N, P, V, R)   noise-free expected data ``m A x + b``
    /sinograms/normalisation (P, V, R)     ``n`` (efficiency products, 0 in block gaps)
    /sinograms/crystal_efficiencies (rings, crystals)
    /samples/y              (S, P, V, R)   Poisson data (integer-valued float32)
    /samples/{image_index, realisation, seed, total_counts}   (S,) metadata
"""

from __future__ import annotations

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST",
    "SPLITS",
    "IMAGE_ARRAYS",
    "IMAGE_META",
    "SINOGRAM_ARRAYS",
    "SAMPLE_META",
    "SUBJECT_FILE",
]

FORMAT_NAME = "fbsem-dataset"
#: part of every recipe hash: a new version makes every cached dataset stale
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: the splits of a dataset, disjoint by subject
SPLITS = ("train", "validation", "test")

#: ``/images`` arrays of shape ``(N, Z, Y, X)`` (``targets``, ``(N, K, Z, Y, X)``, aside)
IMAGE_ARRAYS = ("activity", "mu_map", "mr", "brain_mask", "lesion_mask_pet", "lesion_mask_mr", "target_final")
#: ``/images`` metadata of shape ``(N,)``
IMAGE_META = ("slice_index", "rotation_deg", "counts", "trues", "scale", "seed")
#: ``/sinograms`` arrays of shape ``(N, P, V, R)``
SINOGRAM_ARRAYS = ("multiplicative", "attenuation", "additive", "ybar")
#: ``/samples`` metadata of shape ``(S,)``
SAMPLE_META = ("image_index", "realisation", "seed", "total_counts")
#: the file of subject ``i``: ``SUBJECT_FILE.format(i)``
SUBJECT_FILE = "subject-{:04d}.h5"
