"""The shared-memory store-rate benchmark (``benchmarks/dsmem_store_rate.py``) compiled
here, without a GPU: its bulk-copy mode is one copy-engine instruction a round."""

from pathlib import Path

from conftest import load_script
from test_sass import sass_of

TOOL = Path(__file__).resolve().parent.parent / "benchmarks" / "dsmem_store_rate.py"


def test_a_bulk_round_is_one_shared_to_shared_bulk_copy(tmp_path):
    tool = load_script(TOOL)
    tool.compile_only(targets=(tool.PEER_BULK,), options=f"--gpu-arch=sm_90a --keep-cubin --dump-dir={tmp_path}")
    (cubin,) = tmp_path.glob("*.cubin")
    sass = sass_of(cubin)
    assert sass.count("UBLKCP.S.S") == 1  # in the round loop, from the first thread
    assert "STAS" not in sass and "ST.E" not in sass  # no thread stores into the peer
