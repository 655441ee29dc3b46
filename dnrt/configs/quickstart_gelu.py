# The quickstart run with GELU and plain cross-entropy (no RAA, no ARR), for comparison with quickstart.py.
from quickstart import *  # noqa: F403

act = "gelu"
criterion = "ce"
output_dir = "./runs/quickstart_gelu"
