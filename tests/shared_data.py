"""Where the tests find the shared evaluation data (read in place, never copied into the repo)."""
from pathlib import Path

EVALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "evaldata"
if not EVALDATA.is_dir():
    EVALDATA = Path("/work/shared/evaldata")
