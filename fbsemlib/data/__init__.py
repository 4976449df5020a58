"""Data: brain phantoms, the simulation recipe, simulation, the dataset format (writer,
reader, :class:`PETDataset`) and the sample contract :class:`PETBatch`."""

from fbsemlib.data.batch import PETBatch
from fbsemlib.data.phantoms import Phantom, PhantomConfig, load_brainweb, make_subject, make_subjects, shepp_logan, simple_phantom
from fbsemlib.data.format import DatasetError, PETDataset, open_dataset, validate_dataset
from fbsemlib.data.simulate import DataConfig, cached_dataset, simulate_dataset
