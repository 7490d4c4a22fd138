"""`python -m klein_ray`: the same CLI as the `klein-ray` script."""

import sys

from klein_ray.cli import main

sys.exit(main())
