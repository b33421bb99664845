"""`python -m meshpost.bench ROLE ...`: a helper process of `meshpost bench` (see children)."""

import sys

from meshpost.bench.children import main, quiet_pipe

with quiet_pipe():
    raise SystemExit(main(sys.argv[1:]))
