"""Data: molecule records, HDF5 I/O, padded batches, splits and reference energies."""

from phljax.data.hdf5 import read_h5, write_h5
from phljax.data.records import Molecule, formula, to_atomic_numbers
