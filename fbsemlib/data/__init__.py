"""Data: brain phantoms, the simulation recipe, simulation, the dataset format (schema,
writer, validation), :class:`PETDataset` and the sample contract :class:`PETBatch`.

Modules, from the bottom up: :mod:`~fbsemlib.data.phantoms` (offline brain subjects),
:mod:`~fbsemlib.data.schema` (names, version and layout on disk),
:mod:`~fbsemlib.data.recipe` (:class:`DataConfig`, :func:`recipe_hash`),
:mod:`~fbsemlib.data.format` (writer, validation, :class:`DatasetInfo`),
:mod:`~fbsemlib.data.batch` (:class:`PETBatch`, :data:`SAMPLE_KEYS`),
:mod:`~fbsemlib.data.dataset` (:class:`PETDataset`) and
:mod:`~fbsemlib.data.simulate` (the simulation, :func:`simulate_dataset`,
:func:`cached_dataset`).
"""

from fbsemlib.data.batch import SAMPLE_KEYS, PETBatch
from fbsemlib.data.dataset import PETDataset
from fbsemlib.data.format import DatasetError, DatasetInfo, open_dataset, validate_dataset
from fbsemlib.data.phantoms import (
    Phantom,
    PhantomConfig,
    load_brainweb,
    make_subject,
    make_subjects,
    shepp_logan,
    simple_phantom,
)
from fbsemlib.data.recipe import DataConfig, load_data_config, recipe_hash
from fbsemlib.data.schema import SPLITS
from fbsemlib.data.simulate import SimulationContext, cached_dataset, default_data_root, simulate_dataset

__all__ = [
    "PETBatch",
    "SAMPLE_KEYS",
    "PETDataset",
    "DatasetError",
    "DatasetInfo",
    "open_dataset",
    "validate_dataset",
    "Phantom",
    "PhantomConfig",
    "load_brainweb",
    "make_subject",
    "make_subjects",
    "shepp_logan",
    "simple_phantom",
    "DataConfig",
    "load_data_config",
    "recipe_hash",
    "SPLITS",
    "SimulationContext",
    "cached_dataset",
    "default_data_root",
    "simulate_dataset",
]
