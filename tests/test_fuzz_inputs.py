"""Property-based fuzz of what users hand the library (issue 13): the experiment-file loader
and the sections' dataclasses, and the sinogram reader of ``fbsem reconstruct``. Whatever the
input, the result is a value or a :class:`~fbsemlib.errors.UserError` (printed as one
``error:`` line, exit 2), never another exception."""

from __future__ import annotations

import io
import types

import numpy as np
import pytest
import torch
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fbsemlib.config import SECTIONS, from_dict, load_experiment  # noqa: E402
from fbsemlib.data import DataConfig  # noqa: E402
from fbsemlib.errors import UserError  # noqa: E402
from fbsemlib.evaluation.user_data import _checked_inputs, read_sinogram_file  # noqa: E402
from fbsemlib.evaluation.baselines import BaselineConfig  # noqa: E402
from fbsemlib.training.config import TrainConfig, parse_model_section  # noqa: E402

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)

DATA_KEYS = [f.name for f in DataConfig.__dataclass_fields__.values()]
TRAIN_KEYS = list(TrainConfig.__dataclass_fields__)
#: a section: mostly the real keys (so values reach the validation), sometimes others
section = st.dictionaries(st.one_of(st.sampled_from(DATA_KEYS + TRAIN_KEYS + ["width", "depth", "num_iterations"]),
                                    st.text(max_size=8)), values, max_size=5)


def _expected(fn):
    try:
        fn()
    except UserError:
        pass


@FUZZ
@given(doc=st.one_of(values, st.dictionaries(st.one_of(st.sampled_from(SECTIONS), st.text(max_size=6)), section,
                                             max_size=4)))
def test_config_loader_gives_a_value_or_a_user_error(doc, tmp_path_factory):
    p = tmp_path_factory.mktemp("fuzz") / "exp.yaml"
    p.write_text(yaml.safe_dump(doc, allow_unicode=True))
    try:
        sections = load_experiment(p)
    except UserError:
        return
    _expected(lambda: from_dict(DataConfig, sections.get("data"), "data"))
    _expected(lambda: from_dict(TrainConfig, sections.get("train"), "train"))
    _expected(lambda: from_dict(BaselineConfig, sections.get("baselines"), "baselines"))
    _expected(lambda: parse_model_section(sections.get("model")))


@FUZZ
@given(text=st.text(max_size=200))
def test_config_loader_on_arbitrary_text(text, tmp_path_factory):
    p = tmp_path_factory.mktemp("fuzz") / "exp.yaml"
    p.write_text(text)
    _expected(lambda: load_experiment(p))


@FUZZ
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".h5", ".npy", ".pt", ".hdf5", ".txt"]))
def test_sinogram_reader_on_arbitrary_bytes(data, suffix, tmp_path_factory):
    p = tmp_path_factory.mktemp("fuzz") / f"scan{suffix}"
    p.write_bytes(data)
    _expected(lambda: read_sinogram_file(p))


def _valid_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


@FUZZ
@given(data=st.binary(min_size=1, max_size=64), cut=st.integers(min_value=0, max_value=200))
def test_sinogram_reader_on_damaged_npy(data, cut, tmp_path_factory):
    raw = bytearray(_valid_npy(np.ones((1, 2, 8, 8), np.float32)))
    pos = min(cut, len(raw) - 1)
    raw[pos: pos + len(data)] = data  # overwrite a stretch (the header included)
    p = tmp_path_factory.mktemp("fuzz") / "scan.npy"
    p.write_bytes(bytes(raw))
    _expected(lambda: read_sinogram_file(p))


P = types.SimpleNamespace(device=torch.device("cpu"), out_shape=(1, 4, 5), in_shape=(1, 3, 3))
arrays = st.builds(
    lambda shape, fill, kind: np.full(shape, fill, dtype=kind),
    st.lists(st.integers(min_value=1, max_value=5), min_size=0, max_size=6).map(tuple),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([np.float32, np.float64, np.int32]),
).filter(lambda a: a.dtype.kind == "f" or np.isfinite(a).all() if a.size else True)


@FUZZ
@given(d=st.dictionaries(st.sampled_from(["y", "multiplicative", "additive", "mr"]), arrays, max_size=4),
       unit=st.booleans(), use_mr=st.booleans())
def test_reconstruct_input_checks_accept_only_valid_data(d, unit, use_mr):
    tensors = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in d.items()}
    try:
        y, mult, add, mr = _checked_inputs(tensors, P, "scan", unit, use_mr)
    except UserError:
        return
    for t in (y, mult, add, mr):
        if t is not None:
            assert t.ndim == 5 and bool(torch.isfinite(t).all())
    assert y.shape[-3:] == P.out_shape and bool((y >= 0).all())
    assert unit or (mult is not None and add is not None)
    assert mult is None or bool((mult > 0).all())
