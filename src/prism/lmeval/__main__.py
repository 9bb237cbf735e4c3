"""`python -m prism.lmeval ARGS`: lm-eval's command line with the `prism` model registered (the
same as `prism lm-eval ARGS`)."""

import sys

from prism.errors import PrismError
from prism.lmeval import main

if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except PrismError as e:  # e.g. the optional extra is missing
        print(f"prism: error: {e}", file=sys.stderr)
        sys.exit(2)
