import sys
import pathlib

# tests import helpers from tests/golden (e.g. ``from golden import training_cases``)
sys.path.insert(0, str(pathlib.Path(__file__).parent))
