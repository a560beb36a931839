"""The molecules of the size-scaling set and their RDKit conformers (the `scale` extra).

:data:`SCALE_MOLECULES` lists C/H/N/O molecules of 10 to ~180 atoms by SMILES (alkanes, alcohols,
amides and peptides, rings and aromatics, larger flexible molecules), in the size bins
:data:`SIZE_BINS`; :func:`conformer` embeds one in 3D by RDKit's ETKDG (v3). The labelling
pipeline that relaxes, samples and labels them is :mod:`phljax.datagen.scale`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["SIZE_BINS", "SCALE_MOLECULES", "ScaleMolecule", "size_bin", "count_atoms", "conformer"]

#: Edges of the size bins, atoms: bin b holds SIZE_BINS[b] <= N < SIZE_BINS[b + 1].
SIZE_BINS = (10, 16, 25, 40, 60, 90, 130, 200)


@dataclasses.dataclass(frozen=True)
class ScaleMolecule:
    """One molecule of the set: a file-safe ``name``, its ``smiles`` (C, H, N, O, neutral, closed
    shell; hydrogens added by RDKit) and its ``family`` (alkane, alcohol, amide, peptide, aromatic,
    ring, flexible)."""

    name: str
    smiles: str
    family: str


def _m(name: str, smiles: str, family: str) -> ScaleMolecule:
    return ScaleMolecule(name, smiles, family)


_ALA = "N[C@@H](C)C(=O)"
#: The molecules, by size bin (atom counts with hydrogens in the comments; tests/test_xtb.py checks the bins).
SCALE_MOLECULES = (
    # 10-15 atoms
    _m("propane", "CCC", "alkane"),  # 11
    _m("butanol", "CCCCO", "alcohol"),  # 15
    _m("glycerol", "OCC(O)CO", "alcohol"),  # 14
    _m("n_methylacetamide", "CNC(C)=O", "amide"),  # 12
    _m("benzene", "c1ccccc1", "aromatic"),  # 12
    _m("pyridine", "c1ccncc1", "aromatic"),  # 11
    # 16-24
    _m("hexane", "CCCCCC", "alkane"),  # 20
    _m("glucose", "OC[C@H]1OC(O)[C@H](O)[C@@H](O)[C@@H]1O", "alcohol"),  # 24
    _m("alanine_dipeptide", "CC(=O)" + _ALA + "NC", "peptide"),  # 22
    _m("naphthalene", "c1ccc2ccccc2c1", "aromatic"),  # 18
    _m("indole", "c1ccc2[nH]ccc2c1", "aromatic"),  # 16
    _m("caffeine", "Cn1cnc2c1c(=O)n(C)c(=O)n2C", "aromatic"),  # 24
    # 25-39
    _m("decane", "C" * 10, "alkane"),  # 32
    _m("dodecanol", "C" * 12 + "O", "alcohol"),  # 39
    _m("pentaglycine", "NCC(=O)NCC(=O)NCC(=O)NCC(=O)NCC(=O)O", "peptide"),  # 38
    _m("coronene", "c1cc2ccc3ccc4ccc5ccc6ccc1c1c2c3c4c5c61", "aromatic"),  # 36
    _m("adamantane", "C1C2CC3CC1CC(C2)C3", "ring"),  # 26
    _m("tetraglyme", "CO" + "CCO" * 4 + "C", "flexible"),  # 37
    # 40-59
    _m("hexadecane", "C" * 16, "alkane"),  # 50
    _m("hexadecanol", "C" * 16 + "O", "alcohol"),  # 51
    _m("sucrose", "OC[C@H]1O[C@@](CO)(O[C@H]2O[C@H](CO)[C@@H](O)[C@H](O)[C@H]2O)[C@@H](O)[C@@H]1O", "alcohol"),  # 45
    _m("ace_ala3_nme", "CC(=O)" + _ALA * 3 + "NC", "peptide"),  # 42
    _m("retinol", "CC1=C(C(C)(C)CCC1)/C=C/C(C)=C/C=C/C(C)=C/CO", "flexible"),  # 51
    # 60-89
    _m("tetracosane", "C" * 24, "alkane"),  # 74
    _m("ace_ala6_nme", "CC(=O)" + _ALA * 6 + "NC", "peptide"),  # 72
    _m(
        "leu_enkephalin",
        "N[C@@H](Cc1ccc(O)cc1)C(=O)NCC(=O)NCC(=O)N[C@@H](Cc1ccccc1)C(=O)N[C@@H](CC(C)C)C(=O)O",
        "peptide",
    ),  # 77  # fmt: skip
    _m("peg8", "CO" + "CCO" * 8 + "C", "flexible"),  # 65
    _m("cholesterol", "CC(C)CCC[C@@H](C)[C@H]1CC[C@H]2[C@@H]3CC=C4C[C@@H](O)CC[C@]4(C)[C@H]3CC[C@]12C", "flexible"),
    # 90-129
    _m("triacontane", "C" * 30, "alkane"),  # 92
    _m("squalane", "CC(C)CCCC(C)CCCC(C)CCCCC(C)CCCC(C)CCCC(C)C", "alkane"),  # 92
    _m("ace_ala10_nme", "CC(=O)" + _ALA * 10 + "NC", "peptide"),  # 112
    _m("peg16", "CO" + "CCO" * 16 + "C", "flexible"),  # 121
    _m("trilaurin", "CCCCCCCCCCCC(=O)OCC(COC(=O)CCCCCCCCCCC)OC(=O)CCCCCCCCCCC", "flexible"),  # 119
    # 130-199
    _m("pentacontane", "C" * 50, "alkane"),  # 152
    _m("ace_ala14_nme", "CC(=O)" + _ALA * 14 + "NC", "peptide"),  # 152
    _m("tripalmitin", "CCCCCCCCCCCCCCCC(=O)OCC(COC(=O)CCCCCCCCCCCCCCC)OC(=O)CCCCCCCCCCCCCCC", "flexible"),  # 155
    _m("peg24", "CO" + "CCO" * 24 + "C", "flexible"),  # 177
    _m(
        "beta_cyclodextrin",
        "OC[C@H]1O[C@@H]2O[C@H]3[C@H](O)[C@@H](O)[C@@H](O[C@@H]3CO)O[C@H]3[C@H](O)[C@@H](O)[C@@H](O[C@@H]3CO)"
        "O[C@H]3[C@H](O)[C@@H](O)[C@@H](O[C@@H]3CO)O[C@H]3[C@H](O)[C@@H](O)[C@@H](O[C@@H]3CO)O[C@H]3[C@H](O)"
        "[C@@H](O)[C@@H](O[C@@H]3CO)O[C@H]3[C@H](O)[C@@H](O)[C@@H](O[C@@H]3CO)O[C@H]1[C@H](O)[C@H]2O",
        "flexible",
    ),  # 147  # fmt: skip
)


def size_bin(n_atoms: int, bins: tuple[int, ...] = SIZE_BINS) -> str:
    """The size bin of a molecule of ``n_atoms`` atoms, as ``'LO-HI'`` (inclusive), e.g. ``'10-15'``.

    Args:
        n_atoms: atoms, hydrogens included.
        bins: increasing bin edges; bin b holds bins[b] <= n_atoms < bins[b + 1].

    Raises:
        ValueError: if ``n_atoms`` lies outside every bin.
    """
    for lo, hi in zip(bins[:-1], bins[1:], strict=True):
        if lo <= n_atoms < hi:
            return f"{lo}-{hi - 1}"
    raise ValueError(f"{n_atoms} atoms is outside the size bins {bins[0]}-{bins[-1] - 1} (edges {list(bins)})")


def _rdkit_mol(smiles: str, where: str):
    from rdkit import Chem  # noqa: PLC0415 (optional: the scale extra)

    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError(f"{where}: RDKit cannot parse SMILES {smiles!r}")
    mol = Chem.AddHs(mol)
    bad = sorted({a.GetSymbol() for a in mol.GetAtoms()} - {"C", "H", "N", "O"})
    charge = Chem.GetFormalCharge(mol)
    radicals = sum(a.GetNumRadicalElectrons() for a in mol.GetAtoms())
    if bad or charge or radicals:
        raise ValueError(f"{where}: {smiles!r} must be neutral closed-shell C/H/N/O "
                         f"(elements {bad}, charge {charge}, radical electrons {radicals})")  # fmt: skip
    return mol


def count_atoms(smiles: str) -> int:
    """Number of atoms of ``smiles`` with its hydrogens (RDKit)."""
    return int(_rdkit_mol(smiles, "count_atoms").GetNumAtoms())


def conformer(smiles: str, seed: int = 0, where: str = "conformer") -> tuple[np.ndarray, np.ndarray]:
    """A 3D conformer of ``smiles`` by RDKit's ETKDG (v3) with ``randomSeed = seed`` and random starting coordinates.

    Returns:
        (numbers [N] int, positions [N, 3] Angstrom), hydrogens included (RDKit's atom order).

    Raises:
        ValueError: naming ``where`` if the SMILES does not parse, is not neutral closed-shell
            C/H/N/O, or ETKDG finds no embedding.
    """
    from rdkit.Chem import AllChem  # noqa: PLC0415 (optional: the scale extra)

    mol = _rdkit_mol(smiles, where)
    params = AllChem.ETKDGv3()
    params.randomSeed = int(seed)
    params.useRandomCoords = True  # start from random coordinates, not eigenvalues of the distance matrix,
    # which fail for long flexible chains (trilaurin, tripalmitin; RDKit recommends it for large molecules)
    if AllChem.EmbedMolecule(mol, params) != 0:
        raise ValueError(f"{where}: ETKDG found no 3D embedding of {smiles!r} (seed {seed})")
    numbers = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=int)
    return numbers, np.asarray(mol.GetConformer().GetPositions(), dtype=np.float64)
