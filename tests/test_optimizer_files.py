"""``distrib_optim.pt`` filled in place (:class:`DistribOptimFile`) is byte for byte what ``torch.save`` writes
for the same vectors (the oracle: ``save_distrib_optim``, i.e. ``torch.save``), whatever order the pieces come
in, with the alignment gaps left as zeros; zip CRCs check out (``zipfile.testzip``)."""
import zipfile

import pytest
import torch

from formats.checkpoint.optimizer_torch import KINDS, DistribOptimFile, save_distrib_optim


def test_in_place_file_equals_torch_save(tmp_path):
    gen = torch.Generator().manual_seed(0)
    dtypes = (torch.bfloat16, torch.float32)
    sizes = {0: 1000, 1: 300}
    vectors = {g: {k: torch.randn(n, generator=gen) for k in KINDS} for g, n in sizes.items()}
    for v in vectors[0].values():
        v[500:520] = 0  # an alignment gap: never written below
    (tmp_path / "ref").mkdir()
    (tmp_path / "mine").mkdir()
    save_distrib_optim({g: (dtypes, v) for g, v in vectors.items()}, tmp_path / "ref" / "distrib_optim.pt")
    out = DistribOptimFile(tmp_path / "mine" / "distrib_optim.pt", {g: (dtypes, n) for g, n in sizes.items()})
    pieces = [(g, k, lo) for g, n in sizes.items() for k in KINDS for lo in range(0, n, 96)]
    for g, k, lo in reversed(pieces):  # back to front, as the buffers' reverse registration order streams
        hi = min(lo + 96, sizes[g])
        if g == 0 and lo < 520 and hi > 500:  # around the gap
            if lo < 500:
                out.write(g, k, lo, vectors[g][k][lo:500])
            if hi > 520:
                out.write(g, k, 520, vectors[g][k][520:hi])
            continue
        out.write(g, k, lo, vectors[g][k][lo:hi])
    with pytest.raises(ValueError, match="outside"):
        out.write(1, "param", 250, torch.zeros(51))
    out.close()
    mine, ref = (tmp_path / "mine" / "distrib_optim.pt").read_bytes(), (tmp_path / "ref" / "distrib_optim.pt").read_bytes()
    assert mine == ref
    with zipfile.ZipFile(tmp_path / "mine" / "distrib_optim.pt") as z:
        assert z.testzip() is None
