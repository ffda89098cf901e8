import pytest

from kvarn import PRESETS, get_preset, layout

# Offsets from upstream's config class (reference notes, table of section 5.4).
UPSTREAM = {
    ("kvarn_k4v2_g128", 128): (8192, 8448, 8704, 8960, 13056, 13312, 13568, 13824),
    ("kvarn_k4v4_g128", 128): (8192, 8448, 8704, 8960, 17152, 17408, 17664, 17920),
    ("kvarn_k4v2_g64", 128): (4096, 4352, 4608, 4736, 6784, 7040, 7168, 7296),
    ("kvarn_k4v4_g64", 128): (4096, 4352, 4608, 4736, 8832, 9088, 9216, 9344),
    ("kvarn_k2v2_g128", 128): (4096, 4352, 4608, 4864, 8960, 9216, 9472, 9728),
    ("kvarn_k4v2_g128", 256): (16384, 16896, 17408, 17664, 25856, 26368, 26624, 26880),
}


@pytest.mark.parametrize("key", list(UPSTREAM))
def test_offsets_match_upstream(key):
    lay = layout(*key)
    f = lay.fields
    got = (f["a_k"].offset, f["z_k"].offset, f["tau_k"].offset, f["v_codes"].offset,
           f["sigma_v"].offset, f["a_v"].offset, f["z_v"].offset, lay.raw_bytes)
    assert got == UPSTREAM[key]


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_fields_tile_the_record(preset, head_dim):
    lay = layout(preset, head_dim)
    end = 0
    for f in lay.fields.values():
        assert f.offset == end and f.offset % 2 == 0
        end += f.nbytes
    assert lay.raw_bytes == end and lay.record_bytes % 16 == 0
    assert 0 <= lay.record_bytes - lay.raw_bytes < 16


def test_default_capacity():
    lay = layout("kvarn_k4v2_g128", 128)
    assert lay.record_bytes == 13824 and lay.bytes_per_token == 108
    assert lay.capacity_vs_fp16 == pytest.approx(4.7407, abs=1e-4)


def test_unknown_preset_names_the_supported_ones():
    with pytest.raises(ValueError, match="kvarn_k4v2_g128"):
        get_preset("kvarn_k3v2_g128")


@pytest.mark.parametrize("head_dim", [32, 96, 512])
def test_unsupported_head_dim(head_dim):
    with pytest.raises(ValueError, match="64, 128, 256"):
        layout("kvarn_k4v2_g128", head_dim)
