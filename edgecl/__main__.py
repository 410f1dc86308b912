"""`python -m edgecl ...`: the `edgecl` command. It is also how torch's launcher starts each rank of a distributed
run (`torchrun --nproc-per-node N -m edgecl train ...`; `edgecl train --nproc N` does the same)."""
import sys

from edgecl.cli import main

if __name__ == "__main__":
    sys.exit(main())
