"""The KV handoff end to end: the torch prefill's cache, moved layer by layer by
:class:`tandem.gpu.transfer.KVTransfer` into a device image, equals in every byte of every layer's
K and V region what the layout makes of the golden model's cache, and nothing else in the image
changes. A transfer that writes zeros, writes a layer into another layer's region or drops a
position fails here, whatever the decoded tokens happen to be."""

from __future__ import annotations

import numpy as np
import pytest

from tandem import layout as L
from tandem.checkpoint import lively_weights
from tandem.config import preset
from tandem.geometry import geometry
from tandem.golden.faithful import FaithfulModel
from tandem.gpu.prefill import PreparedModel, prefill
from tandem.gpu.transfer import KVTransfer
from tandem.seeds import seed


@pytest.fixture(scope="module")
def model():
    cfg = preset("test-odd")  # 3 layers, 3 heads of 32 (padded to 64), 48 positions
    fm = FaithfulModel(cfg, lively_weights(cfg, seed=3))
    return cfg, fm, PreparedModel(cfg, fm.weights, "cpu")


@pytest.mark.parametrize("geom_name", ["tiny", "small"])
@pytest.mark.parametrize("T", [1, 5, 47])
def test_every_layer_region_equals_the_golden_cache_packing(model, geom_name, T):
    cfg, fm, pm = model
    geom = geometry(geom_name)
    layout = L.HBMLayout(cfg, geom)
    image = L.HBMImage(geom, layout.channel_bytes)
    rng = np.random.default_rng(seed(T))
    image.data[:] = rng.integers(0, 256, image.data.shape, dtype=np.uint8)  # not zeros
    before = image.data.copy()

    ids = [(5 + 11 * i) % cfg.n_vocab for i in range(T)]
    transfer = KVTransfer(image, layout, "cpu")
    prefill(cfg, pm, ids, on_layer=transfer.on_layer)
    report = transfer.finish()
    assert [t.layer for t in report.layers] == list(range(cfg.n_layer))

    cache = fm.new_cache()
    fm.prefill(ids, cache)
    n = L.kv_prefix_bytes(geom, cfg.n_head, T)
    touched = np.zeros(image.data.shape, bool)
    for layer in range(cfg.n_layer):
        want_k, want_v = L.pack_kv_prefix(
            geom, cache.k[layer, :, :T], cache.vt[layer, :, :, :T].transpose(0, 2, 1)
        )
        assert want_k.shape == (geom.channels, n)
        assert want_k.any() and want_v.any()
        for part, want in (("k", want_k), ("v", want_v)):
            base = layout[f"h.{layer}.{part}"].base
            got = image.data[:, base : base + n]
            assert np.array_equal(got, want), f"layer {layer} {part.upper()} differs"
            touched[:, base : base + n] = True
    # every other byte of the image is as it was
    assert np.array_equal(image.data[~touched], before[~touched])


def test_layers_differ_so_a_misplaced_layer_is_visible(model):
    """The check above can see a layer written into another's region: the layers' packed caches
    differ from each other (lively weights, a prompt of several tokens)."""
    cfg, fm, _ = model
    cache = fm.new_cache()
    fm.prefill([1, 2, 3, 4], cache)
    geom = geometry("tiny")
    packed = [
        L.pack_kv_prefix(geom, cache.k[i, :, :4], cache.vt[i, :, :, :4].transpose(0, 2, 1))
        for i in range(cfg.n_layer)
    ]
    for a in range(cfg.n_layer):
        for b in range(a + 1, cfg.n_layer):
            assert not np.array_equal(packed[a][0], packed[b][0])
            assert not np.array_equal(packed[a][1], packed[b][1])
