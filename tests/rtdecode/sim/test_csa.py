import warnings

import pytest

from rtdecode.sim.csa import encode_csa2

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    from nibabel.nicom import csareader


def test_nibabel_reads_what_we_encode():
    header = encode_csa2(
        {
            "NumberOfImagesInMosaic": ("US", [83]),
            "SliceNormalVector": ("FD", [0.0, 0.1218693, 0.99254615]),
            "MosaicRefAcqTimes": ("FD", [0.0, 800.0, 20.0]),
            "AcquisitionMatrixText": ("SH", ["104p*81"]),
        }
    )
    parsed = csareader.read(header)
    assert parsed["type"] == 2 and parsed["n_tags"] == 4
    assert csareader.get_n_mosaic(parsed) == 83
    assert csareader.get_slice_normal(parsed) == pytest.approx([0.0, 0.1218693, 0.99254615])
    assert parsed["tags"]["MosaicRefAcqTimes"]["items"] == [0.0, 800.0, 20.0]
    assert parsed["tags"]["AcquisitionMatrixText"]["items"] == ["104p*81"]
