"""`python -m kdtool.cli` (what `accelerate launch -m kdtool.cli ...` runs)."""
from kdtool.cli import main

main()
