"""Data: molecule records, HDF5 I/O, padded batches, splits and reference energies."""

from phljax.data.batching import BatchBudget, GraphBatch, budget_for, edges_within, iterate_batches, make_batch
from phljax.data.hdf5 import read_h5, write_h5
from phljax.data.prepare import (
    DEFAULT_DATA,
    bundled_path,
    check_elements,
    composition_matrix,
    dataset_statistics,
    default_data,
    fit_atomic_energies,
    force_rms,
    load,
    mean_neighbors,
    select_records,
    split,
    split_indices,
    unidentified_formulas,
)
from phljax.data.records import Molecule, formula, to_atomic_numbers
