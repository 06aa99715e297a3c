"""The repository checkout the tests run from, whatever folder a test file sits in."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
